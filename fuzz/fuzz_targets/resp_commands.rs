//! Differential: a sequence of Redis commands run against a member's store
//! and against a model of Redis for the supported subset (no expiry), in any
//! of the 16 databases (one model each) and inside MULTI/EXEC. The replies
//! must agree; raw arguments also run, to reach every parser branch.
#![no_main]
use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sessionmesh_fuzz::model::{same, Cmd, Model};
use sessionmesh_sidecar::front::resp::commands::{exec, exec_multi, RedisState};
use sessionmesh_sidecar::front::resp::protocol::Value;
use sessionmesh_sidecar::node::{Step, Tx};

#[derive(Debug, Arbitrary)]
enum Input {
    Modelled(Cmd),
    /// A command in database `n % 16`.
    InDb(u8, Cmd),
    /// MULTI ... EXEC in database 0.
    Multi(Vec<Cmd>),
    /// Any command name from the data set, with arbitrary arguments.
    Raw(u8, Vec<Vec<u8>>),
}

const NAMES: &[&str] = &[
    "GET",
    "SET",
    "SETEX",
    "PSETEX",
    "GETEX",
    "GETDEL",
    "MGET",
    "MSET",
    "DEL",
    "UNLINK",
    "EXISTS",
    "EXPIRE",
    "PEXPIRE",
    "EXPIREAT",
    "PEXPIREAT",
    "PERSIST",
    "TTL",
    "PTTL",
    "RENAME",
    "RENAMENX",
    "TYPE",
    "SCAN",
    "DBSIZE",
    "HSET",
    "HMSET",
    "HGET",
    "HMGET",
    "HGETALL",
    "HDEL",
    "HEXISTS",
    "HLEN",
    "HKEYS",
    "HVALS",
    "FLUSHDB",
    "FLUSHALL",
    "SETNX",
    "GETSET",
    "INCR",
    "INCRBY",
    "DECR",
    "DECRBY",
    "HSETNX",
    "HINCRBY",
    "EXPIRETIME",
    "PEXPIRETIME",
    "PING",
    "ECHO",
    "TIME",
    "UNWATCH",
];

fuzz_target!(|inputs: Vec<Input>| {
    let mut core = sessionmesh_fuzz::lone_core();
    let mut st = RedisState::new(true, None);
    let mut models: Vec<Model> = (0..16).map(|_| Model::default()).collect();
    let mut next = 1;
    let mut modelled = true;
    for input in inputs.iter().take(64) {
        let mut tx = Tx::new(&mut core, sessionmesh_fuzz::T0 + 10, &mut next);
        match input {
            Input::Modelled(c) | Input::InDb(_, c) => {
                let db = match input {
                    Input::InDb(n, _) => n % 16,
                    _ => 0,
                };
                let got = match exec(&mut tx, &mut st, db, &[c.args()]) {
                    Step::Ready(mut v) => v.remove(0),
                    Step::After(_) => panic!("a member without peers never waits"),
                };
                if modelled {
                    let want = models[db as usize].run(c);
                    assert!(
                        same(&got, &want),
                        "db {db} {c:?}: sidecar {got:?}, Redis {want:?}"
                    );
                }
            }
            Input::Multi(cmds) => {
                let args: Vec<Vec<Bytes>> = cmds.iter().take(16).map(Cmd::args).collect();
                let got = match exec_multi(&mut tx, &mut st, 0, &args, &[]) {
                    Step::Ready(v) => v.expect("nothing is watched"),
                    Step::After(_) => panic!("a member without peers never waits"),
                };
                if modelled {
                    let want: Vec<Value> = cmds.iter().take(16).map(|c| models[0].run(c)).collect();
                    assert!(
                        same(&Value::Array(got.clone()), &Value::Array(want.clone())),
                        "MULTI {cmds:?}: sidecar {got:?}, Redis {want:?}"
                    );
                }
            }
            Input::Raw(n, rest) => {
                // Once raw commands ran (with TTLs, renames, flushes...), the
                // model no longer knows the state; only robustness is checked then.
                modelled = false;
                let mut v = vec![Bytes::from_static(
                    NAMES[*n as usize % NAMES.len()].as_bytes(),
                )];
                v.extend(rest.iter().take(8).map(|a| Bytes::copy_from_slice(a)));
                let db = n % 3;
                let _ = exec(&mut tx, &mut st, db, &[v]);
            }
        }
    }
});
