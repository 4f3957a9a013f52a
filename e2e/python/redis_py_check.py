"""redis-py (RESP3 by default in redis-py 8, no RESP2 fallback) against three sidecars.

Usage: redis_py_check.py PORT1 PORT2 PORT3. Exits non-zero on the first failed check.
"""
import sys
import time

import redis

a, b, c = (redis.Redis(host="127.0.0.1", port=int(p), protocol=3, decode_responses=True) for p in sys.argv[1:4])


def wait(pred, what, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


assert a.ping() is True
assert a.connection_pool.get_connection().protocol in (3, "3")
info = a.info()
assert info["loading"] == 0, info

# Strings with TTL, replicated with the same absolute expiry.
assert a.set("sess:1", "alice", ex=100) is True
wait(lambda: b.get("sess:1") == "alice", "sess:1 on b")
assert 99 <= b.ttl("sess:1") <= 100
assert abs(b.pttl("sess:1") - a.pttl("sess:1")) < 1000
assert a.set("sess:1", "bob", xx=True, keepttl=True) is True
wait(lambda: c.get("sess:1") == "bob", "sess:1 on c")
assert c.ttl("sess:1") > 90
assert a.set("sess:1", "x", nx=True) is None
assert a.getdel("sess:1") == "bob"
wait(lambda: b.exists("sess:1") == 0, "delete on b")

# Hashes like Spring Session (HSET of changed fields, PEXPIREAT, HGETALL).
assert a.hset("spring:session:sessions:42", mapping={"creationTime": "1", "sessionAttr:user": "alice"}) == 2
assert a.pexpireat("spring:session:sessions:42", int(time.time() * 1000) + 60_000) is True
wait(lambda: b.hgetall("spring:session:sessions:42") == {"creationTime": "1", "sessionAttr:user": "alice"}, "hash on b")
assert 55 <= b.ttl("spring:session:sessions:42") <= 60
assert b.type("spring:session:sessions:42") == "hash"
assert a.hdel("spring:session:sessions:42", "creationTime") == 1
assert a.rename("spring:session:sessions:42", "spring:session:sessions:43") is True
wait(lambda: c.hgetall("spring:session:sessions:43") == {"sessionAttr:user": "alice"}, "rename on c")

# Pipelines, MGET/MSET, SCAN.
p = a.pipeline(transaction=False)
for i in range(50):
    p.set(f"scan:{i}", i, px=60_000)
assert all(p.execute())
wait(lambda: len(list(b.scan_iter(match="scan:*", count=7))) == 50, "scan on b")
assert a.mset({"m1": "1", "m2": "2"}) is True
assert a.mget("m1", "m2", "nope") == ["1", "2", None]

# Errors keep Redis's shapes.
try:
    a.hset("m1", "f", "v")
    raise AssertionError("WRONGTYPE expected")
except redis.ResponseError as e:
    assert str(e).startswith("WRONGTYPE"), e
try:
    a.execute_command("NOSUCHCOMMAND", "x")
    raise AssertionError("unknown command expected")
except redis.ResponseError as e:
    assert "unknown command" in str(e), e

# A 2 s TTL is gone everywhere after it.
a.set("short", "v", px=2000)
wait(lambda: c.get("short") == "v", "short on c")
time.sleep(2.05)
assert [x.get("short") for x in (a, b, c)] == [None, None, None]
print("redis-py ok")
