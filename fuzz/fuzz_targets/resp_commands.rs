//! Differential: a sequence of Redis commands run against a member's store
//! and against a model of Redis for the supported subset (no expiry). The
//! replies must agree; raw arguments also run, to reach every parser branch.
#![no_main]
use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sessionmesh_fuzz::model::{same, Cmd, Model};
use sessionmesh_sidecar::front::resp::commands::{exec, RedisState};
use sessionmesh_sidecar::node::{Step, Tx};

#[derive(Debug, Arbitrary)]
enum Input {
    Modelled(Cmd),
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
];

fuzz_target!(|inputs: Vec<Input>| {
    let mut core = sessionmesh_fuzz::lone_core();
    let mut st = RedisState::default();
    let mut model = Model::default();
    let mut next = 1;
    let mut modelled = true;
    for input in inputs.iter().take(64) {
        let args: Vec<Bytes> = match input {
            Input::Modelled(c) => c.args(),
            Input::Raw(n, rest) => {
                // Once raw commands ran (with TTLs, renames...), the model no
                // longer knows the state; only robustness is checked then.
                modelled = false;
                let mut v = vec![Bytes::from_static(
                    NAMES[*n as usize % NAMES.len()].as_bytes(),
                )];
                v.extend(rest.iter().take(8).map(|a| Bytes::copy_from_slice(a)));
                v
            }
        };
        let mut tx = Tx::new(&mut core, sessionmesh_fuzz::T0 + 10, &mut next);
        let got = match exec(&mut tx, &mut st, &[args]) {
            Step::Ready(mut v) => v.remove(0),
            Step::After(_) => panic!("a member without peers never waits"),
        };
        if let (true, Input::Modelled(c)) = (modelled, input) {
            let want = model.run(c);
            assert!(same(&got, &want), "{c:?}: sidecar {got:?}, Redis {want:?}");
        }
    }
});
