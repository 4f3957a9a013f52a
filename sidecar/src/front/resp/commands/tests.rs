//! Data commands against one member's core.

use super::*;
use crate::core::identity::{Generation, NodeId};
use crate::core::{Core, CoreConfig, Phase};

fn core() -> Core {
    let mut c = Core::new(
        NodeId {
            name: "a".into(),
            generation: Generation(1),
        },
        CoreConfig::default(),
        &[],
        0,
    );
    c.tick(1);
    assert_eq!(c.phase(), &Phase::Ready);
    c
}

fn run(c: &mut Core, st: &mut RedisState, now: u64, cmd: &[&str]) -> Value {
    let args: Vec<Bytes> = cmd
        .iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect();
    let mut w = 1;
    let mut tx = Tx::new(c, now, &mut w);
    match exec(&mut tx, st, 0, &[args]) {
        Step::Ready(mut v) => v.remove(0),
        Step::After(_) => panic!("a single member never waits"),
    }
}

#[test]
fn strings_ttls_and_types() {
    let (mut c, mut st) = (core(), RedisState::default());
    assert_eq!(
        run(&mut c, &mut st, 1000, &["SET", "k", "v", "PX", "2000"]),
        Value::ok()
    );
    assert_eq!(run(&mut c, &mut st, 1500, &["GET", "k"]), Value::str("v"));
    assert_eq!(run(&mut c, &mut st, 1500, &["PTTL", "k"]), Value::Int(1500));
    assert_eq!(run(&mut c, &mut st, 1500, &["TTL", "k"]), Value::Int(2));
    assert_eq!(
        run(&mut c, &mut st, 1500, &["SET", "k", "w", "KEEPTTL"]),
        Value::ok()
    );
    assert_eq!(
        run(&mut c, &mut st, 1600, &["PTTL", "k"]),
        Value::Int(1400),
        "KEEPTTL kept the absolute expiry"
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["GET", "k"]),
        Value::Null,
        "expired exactly at its time"
    );
    assert_eq!(run(&mut c, &mut st, 3000, &["TTL", "k"]), Value::Int(-2));
    assert_eq!(
        run(&mut c, &mut st, 3000, &["SET", "k", "again", "NX"]),
        Value::ok()
    );
    assert_eq!(run(&mut c, &mut st, 3000, &["TTL", "k"]), Value::Int(-1));
    assert_eq!(
        run(&mut c, &mut st, 3000, &["SET", "k", "x", "NX"]),
        Value::Null
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["SET", "k", "x", "XX", "GET"]),
        Value::str("again")
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["TYPE", "k"]),
        Value::Simple("string".into())
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["HSET", "k", "f", "v"]),
        Value::err(WRONGTYPE)
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["DEL", "k", "nope"]),
        Value::Int(1)
    );
    assert_eq!(run(&mut c, &mut st, 3000, &["EXISTS", "k"]), Value::Int(0));
    assert_eq!(
        run(&mut c, &mut st, 3000, &["SET", "k", "reborn"]),
        Value::ok(),
        "a deleted key can be set again"
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["GETDEL", "k"]),
        Value::str("reborn")
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["SET", "k", "v", "EX", "0"]),
        Value::err("ERR invalid expire time in 'set' command")
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["SET", "k", "v", "BOGUS"]),
        Value::err(SYNTAX)
    );
    assert_eq!(
        run(&mut c, &mut st, 3000, &["GET"]),
        Value::err("ERR wrong number of arguments for 'get' command")
    );
}

#[test]
fn expire_family() {
    let (mut c, mut st) = (core(), RedisState::default());
    run(&mut c, &mut st, 1000, &["SET", "k", "v"]);
    assert_eq!(
        run(&mut c, &mut st, 1000, &["EXPIRE", "k", "10", "XX"]),
        Value::Int(0)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["EXPIRE", "k", "10"]),
        Value::Int(1)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["PEXPIREAT", "k", "5000"]),
        Value::Int(1)
    );
    assert_eq!(run(&mut c, &mut st, 1000, &["PTTL", "k"]), Value::Int(4000));
    assert_eq!(
        run(&mut c, &mut st, 1000, &["EXPIRE", "k", "100", "LT"]),
        Value::Int(0)
    );
    assert_eq!(run(&mut c, &mut st, 1000, &["PERSIST", "k"]), Value::Int(1));
    assert_eq!(run(&mut c, &mut st, 1000, &["TTL", "k"]), Value::Int(-1));
    assert_eq!(
        run(&mut c, &mut st, 1000, &["EXPIRE", "k", "-1"]),
        Value::Int(1)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["EXISTS", "k"]),
        Value::Int(0),
        "a past expiry deletes"
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["EXPIRE", "missing", "10"]),
        Value::Int(0)
    );
}

#[test]
fn hashes_like_spring_session() {
    let (mut c, mut st) = (core(), RedisState::default());
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HSET", "h", "a", "1", "b", "2"]),
        Value::Int(2)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HMSET", "h", "b", "3", "c", ""]),
        Value::ok()
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HGET", "h", "b"]),
        Value::str("3")
    );
    assert_eq!(run(&mut c, &mut st, 1000, &["HLEN", "h"]), Value::Int(3));
    assert_eq!(
        run(&mut c, &mut st, 1000, &["PEXPIREAT", "h", "61000"]),
        Value::Int(1)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HGETALL", "h"]),
        Value::Map(vec![
            (Value::str("a"), Value::str("1")),
            (Value::str("b"), Value::str("3")),
            (Value::str("c"), Value::str(""))
        ])
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HDEL", "h", "a", "a", "zz"]),
        Value::Int(1)
    );
    assert_eq!(
        run(&mut c, &mut st, 2000, &["PTTL", "h"]),
        Value::Int(59000),
        "hash writes keep the TTL"
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HEXISTS", "h", "a"]),
        Value::Int(0)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["GET", "h"]),
        Value::err(WRONGTYPE)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["RENAME", "h", "h2"]),
        Value::ok()
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HKEYS", "h2"]),
        Value::Array(vec![Value::str("b"), Value::str("c")])
    );
    assert_eq!(run(&mut c, &mut st, 1000, &["EXISTS", "h"]), Value::Int(0));
    assert_eq!(
        run(&mut c, &mut st, 1000, &["HDEL", "h2", "b", "c"]),
        Value::Int(2)
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["TYPE", "h2"]),
        Value::Simple("none".into())
    );
    assert_eq!(
        run(&mut c, &mut st, 1000, &["RENAME", "nope", "x"]),
        Value::err("ERR no such key")
    );
}

#[test]
fn scan_walks_every_key_once() {
    let (mut c, mut st) = (core(), RedisState::default());
    for i in 0..25 {
        run(&mut c, &mut st, 1000, &["SET", &format!("sess:{i}"), "v"]);
    }
    run(&mut c, &mut st, 1000, &["HSET", "other", "f", "v"]);
    let mut cursor = "0".to_owned();
    let mut seen = Vec::new();
    loop {
        let Value::Array(r) = run(
            &mut c,
            &mut st,
            1000,
            &["SCAN", &cursor, "MATCH", "sess:*", "COUNT", "7"],
        ) else {
            panic!()
        };
        let Value::Bulk(next) = &r[0] else { panic!() };
        let Value::Array(keys) = &r[1] else { panic!() };
        seen.extend(keys.iter().cloned());
        cursor = String::from_utf8_lossy(next).into_owned();
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(seen.len(), 25);
    assert_eq!(run(&mut c, &mut st, 1000, &["DBSIZE"]), Value::Int(26));
    assert_eq!(
        run(&mut c, &mut st, 1000, &["SCAN", "12345"]),
        Value::err("ERR invalid cursor")
    );
}

/// The former recursive matcher, as a reference for the new one.
fn glob_reference(pattern: &[u8], s: &[u8]) -> bool {
    fn m(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') => (0..=s.len()).any(|i| m(&p[1..], &s[i..])),
            Some(b'?') => !s.is_empty() && m(&p[1..], &s[1..]),
            Some(b'[') => {
                let Some(&c) = s.first() else { return false };
                let mut i = 1;
                let neg = p.get(1) == Some(&b'^');
                if neg {
                    i += 1;
                }
                let mut hit = false;
                while i < p.len() && p[i] != b']' {
                    if p[i] == b'\\' && i + 1 < p.len() {
                        hit |= p[i + 1] == c;
                        i += 2;
                    } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                        hit |= (p[i].min(p[i + 2])..=p[i].max(p[i + 2])).contains(&c);
                        i += 3;
                    } else {
                        hit |= p[i] == c;
                        i += 1;
                    }
                }
                i < p.len() && hit != neg && m(&p[i + 1..], &s[1..])
            }
            Some(b'\\') if p.len() > 1 => s.first() == Some(&p[1]) && m(&p[2..], &s[1..]),
            Some(&c) => s.first() == Some(&c) && m(&p[1..], &s[1..]),
        }
    }
    m(pattern, s)
}

proptest::proptest! {
    #[test]
    fn glob_agrees_with_the_recursive_reference(
        p in proptest::collection::vec(proptest::sample::select(b"ab*?[]^-\\".to_vec()), 0..10),
        s in proptest::collection::vec(proptest::sample::select(b"ab-*".to_vec()), 0..10),
    ) {
        proptest::prop_assert_eq!(glob(&p, &s), glob_reference(&p, &s), "pattern {:?} on {:?}", String::from_utf8_lossy(&p), String::from_utf8_lossy(&s));
    }
}

#[test]
fn pathological_patterns_finish_at_once() {
    // Redis's CVE-2022-36021 patterns and worse: exponential for a backtracking matcher.
    let s = vec![b'a'; 4096];
    let t = std::time::Instant::now();
    for p in [
        &b"a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b"[..],
        b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
        b"[a]*[a]*[a]*[a]*[a]*[a]*[a]*[a]*c",
    ] {
        assert!(!glob(p, &s));
    }
    assert!(glob(b"a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a", &s));
    assert!(
        t.elapsed() < std::time::Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn globs() {
    assert!(glob(b"sess:*", b"sess:abc"));
    assert!(!glob(b"sess:*", b"session"));
    assert!(glob(b"h?llo", b"hello"));
    assert!(glob(b"h[ae]llo", b"hallo"));
    assert!(!glob(b"h[^e]llo", b"hello"));
    assert!(glob(b"h[a-c]llo", b"hbllo"));
    assert!(glob(b"a\\*b", b"a*b"));
    assert!(!glob(b"a\\*b", b"axb"));
}

#[test]
fn unknown_commands_have_redis_shape() {
    let (mut c, mut st) = (core(), RedisState::default());
    assert_eq!(
        run(&mut c, &mut st, 1000, &["FOO", "a", "b"]),
        Value::err("ERR unknown command 'FOO', with args beginning with: 'a' 'b' ")
    );
}

/// Found by the fuzzer: the commands a transaction may hold that need no
/// store (ECHO, PING) were answered before their arity was checked, and ECHO
/// without its argument panicked.
#[test]
fn commands_without_the_store_are_held_to_their_arity_too() {
    let (mut c, mut st) = (core(), RedisState::default());
    for cmd in [
        &["ECHO"][..],
        &["ECHO", "a", "b"],
        &["PING", "a", "b"],
        &["TIME", "x"],
        &["UNWATCH", "x"],
    ] {
        assert_eq!(
            run(&mut c, &mut st, 1000, cmd),
            arity_error(cmd[0]),
            "{cmd:?}"
        );
    }
    assert_eq!(run(&mut c, &mut st, 1000, &["ECHO", "a"]), Value::str("a"));
    assert_eq!(
        run(&mut c, &mut st, 1000, &["PING"]),
        Value::Simple("PONG".into())
    );
}
