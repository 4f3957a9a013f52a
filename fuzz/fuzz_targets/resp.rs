//! The RESP parser (multibulk and inline) on arbitrary bytes, with the
//! endpoint's limits: every command it returns respects them.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::front::resp::protocol::{parse, Limits};

fuzz_target!(|data: &[u8]| {
    let lim = Limits {
        max_bulk: 4096,
        max_args: 64,
        max_request: 16 * 1024,
    };
    let mut buf = BytesMut::from(data);
    for _ in 0..256 {
        match parse(&mut buf, &lim) {
            Ok(Some(cmd)) => {
                assert!(cmd.len() <= lim.max_args, "more arguments than the limit");
                assert!(
                    cmd.iter().all(|a| a.len() <= lim.max_bulk),
                    "an argument past the limit"
                );
            }
            Ok(None) | Err(_) => break,
        }
    }
});
