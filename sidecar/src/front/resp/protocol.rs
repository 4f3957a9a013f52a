//! RESP2/RESP3 framing: request parsing (multibulk and inline) with limits
//! checked before allocation, and reply encoding for either protocol version.
//!
//! Invariants: a partial request is `Ok(None)`; a malformed one is an error
//! after which the connection must close (as Redis does); nothing here panics
//! on input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single argument.
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Largest whole command (all arguments).
    pub max_request: usize,
}

/// A request that cannot be parsed. The connection is closed after the error reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("Protocol error: invalid multibulk length")]
    MultibulkLength,
    #[error("Protocol error: invalid bulk length")]
    BulkLength,
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("Protocol error: too big inline request")]
    InlineTooBig,
    #[error("Protocol error: unbalanced quotes in request")]
    Unbalanced,
    #[error("Protocol error: request of {len} bytes exceeds the limit of {max} bytes")]
    TooBig { len: usize, max: usize },
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| p + from)
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Splits one command off `buf`.
pub fn parse(buf: &mut BytesMut, lim: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        return parse_inline(buf, lim);
    }
    let Some(end) = find_crlf(buf, 1) else {
        return if buf.len() > 64 {
            Err(ProtocolError::MultibulkLength)
        } else {
            Ok(None)
        };
    };
    let n = parse_int(&buf[1..end]).ok_or(ProtocolError::MultibulkLength)?;
    if n > lim.max_args as i64 {
        return Err(ProtocolError::MultibulkLength);
    }
    if n <= 0 {
        buf.advance(end + 2);
        return Ok(Some(Vec::new()));
    }
    // First pass: find where the command ends without copying anything.
    let mut pos = end + 2;
    let mut spans = Vec::with_capacity((n as usize).min(1024));
    for _ in 0..n {
        if pos >= buf.len() {
            return check_partial(buf, lim);
        }
        if buf[pos] != b'$' {
            return Err(ProtocolError::ExpectedBulk(buf[pos] as char));
        }
        let Some(e) = find_crlf(buf, pos + 1) else {
            return if buf.len() - pos > 32 {
                Err(ProtocolError::BulkLength)
            } else {
                check_partial(buf, lim)
            };
        };
        let len = parse_int(&buf[pos + 1..e]).ok_or(ProtocolError::BulkLength)?;
        if len < 0 || len as usize > lim.max_bulk {
            return Err(ProtocolError::BulkLength);
        }
        let start = e + 2;
        let stop = start + len as usize;
        if stop - (end + 2) > lim.max_request {
            return Err(ProtocolError::TooBig {
                len: stop,
                max: lim.max_request,
            });
        }
        if buf.len() < stop + 2 {
            return check_partial(buf, lim);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(ProtocolError::BulkLength);
        }
        spans.push((start, stop));
        pos = stop + 2;
    }
    let whole = buf.split_to(pos).freeze();
    Ok(Some(
        spans.into_iter().map(|(a, b)| whole.slice(a..b)).collect(),
    ))
}

fn check_partial(buf: &BytesMut, lim: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    if buf.len() > lim.max_request + 64 * 1024 {
        return Err(ProtocolError::TooBig {
            len: buf.len(),
            max: lim.max_request,
        });
    }
    Ok(None)
}

/// Longest inline command line, as in Redis.
const MAX_INLINE: usize = 64 * 1024;

/// An inline command: words split on spaces, with quotes. It is held to the
/// same limits as a multibulk one (arguments, argument size), and its line to
/// `MAX_INLINE` whether or not its newline has arrived.
fn parse_inline(buf: &mut BytesMut, lim: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Err(ProtocolError::InlineTooBig)
        } else {
            Ok(None)
        };
    };
    if nl > MAX_INLINE {
        return Err(ProtocolError::InlineTooBig);
    }
    let line = buf.split_to(nl + 1);
    let text = line.strip_suffix(b"\n").unwrap_or(&line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let mut args = Vec::new();
    let mut cur = Vec::new();
    let mut in_word = false;
    let mut quote: Option<u8> = None;
    for &c in text {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == b'"' || c == b'\'' => {
                quote = Some(c);
                in_word = true;
            }
            None if c == b' ' || c == b'\t' => {
                if in_word {
                    args.push(Bytes::from(std::mem::take(&mut cur)));
                    in_word = false;
                }
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(ProtocolError::Unbalanced);
    }
    if in_word {
        args.push(Bytes::from(cur));
    }
    if args.len() > lim.max_args {
        return Err(ProtocolError::MultibulkLength);
    }
    if let Some(a) = args.iter().find(|a| a.len() > lim.max_bulk) {
        return Err(ProtocolError::TooBig {
            len: a.len(),
            max: lim.max_bulk,
        });
    }
    Ok(Some(args))
}

/// A reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Bytes),
    Null,
    NullArray,
    Array(Vec<Value>),
    /// A map in RESP3, a flat array of pairs in RESP2.
    Map(Vec<(Value, Value)>),
    /// Text: a bulk string in RESP2, a verbatim string in RESP3.
    Verbatim(String),
}

impl Value {
    pub fn ok() -> Value {
        Value::Simple("OK".into())
    }
    pub fn err(msg: impl Into<String>) -> Value {
        Value::Error(msg.into())
    }
    pub fn bulk(b: impl Into<Bytes>) -> Value {
        Value::Bulk(b.into())
    }
    pub fn str(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }
    pub fn is_error(&self) -> bool {
        matches!(self, Value::Error(_))
    }
}

fn line(out: &mut BytesMut, prefix: u8, s: &str) {
    out.put_u8(prefix);
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

/// Encodes a reply for protocol version 2 or 3.
pub fn encode(v: &Value, proto: u8, out: &mut BytesMut) {
    match v {
        Value::Simple(s) => line(out, b'+', &s.replace(['\r', '\n'], " ")),
        Value::Error(s) => line(out, b'-', &s.replace(['\r', '\n'], " ")),
        Value::Int(i) => line(out, b':', &i.to_string()),
        Value::Bulk(b) => {
            line(out, b'$', &b.len().to_string());
            out.put_slice(b);
            out.put_slice(b"\r\n");
        }
        Value::Null if proto >= 3 => out.put_slice(b"_\r\n"),
        Value::Null => out.put_slice(b"$-1\r\n"),
        Value::NullArray if proto >= 3 => out.put_slice(b"_\r\n"),
        Value::NullArray => out.put_slice(b"*-1\r\n"),
        Value::Array(items) => {
            line(out, b'*', &items.len().to_string());
            for i in items {
                encode(i, proto, out);
            }
        }
        Value::Map(pairs) => {
            if proto >= 3 {
                line(out, b'%', &pairs.len().to_string());
            } else {
                line(out, b'*', &(pairs.len() * 2).to_string());
            }
            for (k, v) in pairs {
                encode(k, proto, out);
                encode(v, proto, out);
            }
        }
        Value::Verbatim(s) if proto >= 3 => {
            line(out, b'=', &(s.len() + 4).to_string());
            out.put_slice(b"txt:");
            out.put_slice(s.as_bytes());
            out.put_slice(b"\r\n");
        }
        Value::Verbatim(s) => encode(&Value::str(s), proto, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `resp` fuzz target: an inline command was held to no
    /// argument limit, and its line to 64 KiB only while its newline was
    /// still to come.
    #[test]
    fn inline_commands_are_held_to_the_same_limits_as_multibulk_ones() {
        let lim = Limits {
            max_bulk: 8,
            max_args: 3,
            max_request: 1 << 20,
        };
        let mut b = BytesMut::from(&b"SET a b c d\r\n"[..]);
        assert_eq!(parse(&mut b, &lim), Err(ProtocolError::MultibulkLength));
        let mut b = BytesMut::from(&b"GET 123456789\r\n"[..]);
        assert_eq!(
            parse(&mut b, &lim),
            Err(ProtocolError::TooBig { len: 9, max: 8 })
        );
        let mut long = vec![b'x'; MAX_INLINE + 1];
        long.extend_from_slice(b"\r\n");
        let mut b = BytesMut::from(&long[..]);
        let big = Limits {
            max_bulk: 1 << 20,
            ..lim
        };
        assert_eq!(parse(&mut b, &big), Err(ProtocolError::InlineTooBig));
        let mut b = BytesMut::from(&b"GET k\r\n"[..]);
        assert_eq!(
            parse(&mut b, &lim),
            Ok(Some(vec![
                Bytes::from_static(b"GET"),
                Bytes::from_static(b"k")
            ]))
        );
    }
    use proptest::prelude::*;

    const LIM: Limits = Limits {
        max_bulk: 1024,
        max_args: 16,
        max_request: 4096,
    };

    fn args(v: &[&str]) -> Vec<Bytes> {
        v.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn multibulk_pipelined_and_partial() {
        let mut b = BytesMut::from(
            &b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGE"[..],
        );
        assert_eq!(parse(&mut b, &LIM).unwrap(), Some(args(&["GET", "k"])));
        assert_eq!(parse(&mut b, &LIM).unwrap(), Some(args(&["PING"])));
        assert_eq!(parse(&mut b, &LIM).unwrap(), None);
        b.extend_from_slice(b"T\r\n$1\r\nx\r\n");
        assert_eq!(parse(&mut b, &LIM).unwrap(), Some(args(&["GET", "x"])));
        assert!(b.is_empty());
    }

    #[test]
    fn inline_commands() {
        let mut b = BytesMut::from(&b"SET k \"hello world\"\r\nPING\n"[..]);
        assert_eq!(
            parse(&mut b, &LIM).unwrap(),
            Some(args(&["SET", "k", "hello world"]))
        );
        assert_eq!(parse(&mut b, &LIM).unwrap(), Some(args(&["PING"])));
        let mut b = BytesMut::from(&b"SET k \"oops\r\n"[..]);
        assert_eq!(parse(&mut b, &LIM), Err(ProtocolError::Unbalanced));
    }

    #[test]
    fn limits_are_checked_before_allocating() {
        let mut b = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$999999999\r\n"[..]);
        assert_eq!(parse(&mut b, &LIM), Err(ProtocolError::BulkLength));
        let mut b = BytesMut::from(&b"*99999999\r\n"[..]);
        assert_eq!(parse(&mut b, &LIM), Err(ProtocolError::MultibulkLength));
        let mut b = BytesMut::from(&b"*1\r\n:12\r\n"[..]);
        assert_eq!(parse(&mut b, &LIM), Err(ProtocolError::ExpectedBulk(':')));
        let mut b = BytesMut::from(&b"*1\r\n$-5\r\n"[..]);
        assert_eq!(parse(&mut b, &LIM), Err(ProtocolError::BulkLength));
        let mut b = BytesMut::from(&b"*1\r\n$2\r\nabcd\r\n"[..]);
        assert_eq!(parse(&mut b, &LIM), Err(ProtocolError::BulkLength));
    }

    #[test]
    fn encodes_both_protocols() {
        let mut o = BytesMut::new();
        encode(
            &Value::Map(vec![(Value::str("a"), Value::Int(1))]),
            3,
            &mut o,
        );
        encode(&Value::Null, 3, &mut o);
        assert_eq!(&o[..], b"%1\r\n$1\r\na\r\n:1\r\n_\r\n");
        let mut o = BytesMut::new();
        encode(
            &Value::Map(vec![(Value::str("a"), Value::Int(1))]),
            2,
            &mut o,
        );
        encode(&Value::Null, 2, &mut o);
        encode(&Value::NullArray, 2, &mut o);
        assert_eq!(&o[..], b"*2\r\n$1\r\na\r\n:1\r\n$-1\r\n*-1\r\n");
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match parse(&mut b, &LIM) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }

        #[test]
        fn any_command_roundtrips(cmd in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..8)) {
            let mut b = BytesMut::new();
            b.put_slice(format!("*{}\r\n", cmd.len()).as_bytes());
            for a in &cmd {
                b.put_slice(format!("${}\r\n", a.len()).as_bytes());
                b.put_slice(a);
                b.put_slice(b"\r\n");
            }
            let got = parse(&mut b, &LIM).unwrap().unwrap();
            prop_assert_eq!(got.iter().map(|x| x.to_vec()).collect::<Vec<_>>(), cmd);
        }
    }
}
