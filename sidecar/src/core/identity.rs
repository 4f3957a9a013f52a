//! Identifiers: session ids (keyed without their route suffix), node identities
//! with a generation, and jvmRoutes.
//!
//! Invariants: a `SessionId` never contains the `.route` suffix, is non-empty,
//! at most `SessionId::MAX_LEN` bytes of printable ASCII; a `NodeId` names one
//! life of one member, so a restarted member (new generation) is a new node.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an id from the outside was refused. Nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The id is empty once its route suffix is removed.
    #[error("session id is empty")]
    Empty,
    /// The id is longer than the limit.
    #[error("session id is longer than {max} bytes")]
    TooLong { max: usize },
    /// The id contains a byte outside printable ASCII or one of `/ ? # % .` in the key part.
    #[error("session id contains a character that is not allowed")]
    BadChar,
    /// A jvmRoute does not match `^[a-z][a-z0-9]{0,15}$`.
    #[error("jvmRoute {0:?} must match ^[a-z][a-z0-9]{{0,15}}$")]
    BadRoute(String),
}

/// A session key: the part of a session id before the first `.`
/// (`ABC.node1` and `ABC.node2` are the same session `ABC`).
///
/// Decoding one from a peer applies the rules of `SessionId::key` (the looser
/// of the two front doors' rules), or those of a Redis key in database 1-15
/// (`SessionId::in_db`), so a frame carrying an id that no local client could
/// have written fails to decode and is refused whole.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct SessionId(String);

impl TryFrom<String> for SessionId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        if let Some(rest) = s.strip_prefix('\u{1}') {
            let (db, key) = rest.split_once('\u{1}').ok_or(IdError::BadChar)?;
            let db: u8 = match db.parse() {
                Ok(n @ 1..=15) if db == n.to_string() => n,
                _ => return Err(IdError::BadChar),
            };
            return Ok(SessionId::in_db(db, SessionId::key(key.as_bytes())?));
        }
        SessionId::key(s.as_bytes())
    }
}

impl SessionId {
    pub const MAX_LEN: usize = 256;

    /// Parses an id as an app sends it, stripping a route suffix.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let key = raw.split_once('.').map_or(raw, |(k, _)| k);
        if key.is_empty() {
            return Err(IdError::Empty);
        }
        if key.len() > Self::MAX_LEN {
            return Err(IdError::TooLong { max: Self::MAX_LEN });
        }
        if !key
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'/' | b'?' | b'#' | b'%'))
        {
            return Err(IdError::BadChar);
        }
        Ok(SessionId(key.to_owned()))
    }

    /// A Redis key used as a session id, as it is (no route suffix is
    /// stripped): 1..=512 bytes of UTF-8 without control characters.
    pub fn key(raw: &[u8]) -> Result<Self, IdError> {
        let s = std::str::from_utf8(raw).map_err(|_| IdError::BadChar)?;
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > 512 {
            return Err(IdError::TooLong { max: 512 });
        }
        if s.chars().any(char::is_control) {
            return Err(IdError::BadChar);
        }
        Ok(SessionId(s.to_owned()))
    }

    /// The id of Redis key `key` in database `db` (0-15): database 0 is the
    /// key itself (shared with the HTTP API); any other database prefixes it
    /// with `\u{1}<db>\u{1}`, which no Redis key or HTTP id can start with,
    /// so databases never meet and each one's keys are contiguous.
    pub fn in_db(db: u8, key: SessionId) -> SessionId {
        if db == 0 {
            key
        } else {
            SessionId(format!("{}{}", Self::db_prefix(db), key.0))
        }
    }

    /// Every id of database `db` > 0 starts with this.
    pub fn db_prefix(db: u8) -> String {
        format!("\u{1}{db}\u{1}")
    }

    /// The database and the Redis key of an id.
    pub fn db_key(&self) -> (u8, &str) {
        if let Some(rest) = self.0.strip_prefix('\u{1}') {
            if let Some((db, key)) = rest.split_once('\u{1}') {
                if let Ok(db) = db.parse() {
                    return (db, key);
                }
            }
        }
        (0, &self.0)
    }

    /// A bound for ordered walks of the store (not an id anyone can use):
    /// database `db`'s keys all sort right after it.
    pub fn db_start(db: u8) -> SessionId {
        if db == 0 {
            // After every "\u{1}..." id, before any key (keys start with a
            // printable character).
            SessionId("\u{2}".into())
        } else {
            SessionId(Self::db_prefix(db))
        }
    }

    /// A fresh random id: 32 hex characters (128 bits) from the OS generator.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        fill_random(&mut b);
        SessionId(hex(&b).to_ascii_uppercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short, stable tag for logs: never the id itself.
    pub fn short(&self) -> String {
        format!("{:08x}", (fnv1a(self.0.as_bytes()) >> 32) as u32)
    }
}

// Debug prints only the short tag, so a stray `{:?}` cannot leak an id into logs.
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId(~{})", self.short())
    }
}

/// A jvmRoute: the suffix a load balancer uses for stickiness.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JvmRoute(String);

impl JvmRoute {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        let b = raw.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 16
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if ok {
            Ok(JvmRoute(raw.to_owned()))
        } else {
            Err(IdError::BadRoute(raw.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JvmRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One life of a member: its name and the generation it started with.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId {
    pub name: String,
    pub generation: Generation,
}

impl NodeId {
    pub fn new(name: String, generation: Generation) -> Self {
        NodeId { name, generation }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.name, self.generation.0)
    }
}

/// One life of a member: a random 64-bit incarnation drawn at start. It needs
/// no clock (a member restarted after its clock stepped back is still a new
/// life) and has no order: peers take the incarnation of the latest
/// authenticated connection as the member's current life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u64);

impl Generation {
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        fill_random(&mut b);
        Generation(u64::from_le_bytes(b).max(1))
    }
}

/// 64-bit FNV-1a: a stable hash used for digests and log tags (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(bytes);
    h.finish()
}

/// FNV-1a fed piece by piece: the same value as `fnv1a` of the pieces
/// joined, without building them in a buffer first.
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills `buf` from the operating system's random source. Handshake nonces
/// and session ids (which are login cookies) must not be guessable, so a
/// failing source ends the process with a clear message rather than falling
/// back to anything predictable. `main` calls `check_random` at start, so this
/// is reported before the member serves anything.
pub fn fill_random(buf: &mut [u8]) {
    if let Err(e) = getrandom::getrandom(buf) {
        tracing::error!(error = %e, "the operating system's random source failed; refusing to continue");
        eprintln!(
            "sessionmesh: the operating system's random source failed ({e}); refusing to continue"
        );
        std::process::exit(71);
    }
}

/// Compares two secrets in constant time: digests of both, so neither the
/// position of the first difference nor the length leaks through timing.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// Whether the operating system's random source works.
pub fn check_random() -> Result<(), String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)
        .map_err(|e| format!("the operating system's random source failed: {e}"))
}

pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_fed_in_pieces_equals_fnv_of_the_pieces_joined() {
        let mut h = Fnv1a::new();
        h.write(b"sess");
        h.write(&[]);
        h.write(b"ion-7");
        assert_eq!(h.finish(), fnv1a(b"session-7"));
        assert_eq!(
            fnv1a(b"a"),
            0xaf63_dc4c_8601_ec8c,
            "the published FNV-1a 64 of \"a\""
        );
    }

    #[test]
    fn ids_of_other_redis_databases_decode_and_nothing_else_with_a_control_character() {
        let k = SessionId::key(b"sess:1").unwrap();
        for db in [0u8, 1, 15] {
            let id = SessionId::in_db(db, k.clone());
            assert_eq!(id.db_key(), (db, "sess:1"));
            let back: SessionId =
                serde_json::from_value(serde_json::to_value(&id).unwrap()).unwrap();
            assert_eq!(back, id);
        }
        for bad in [
            "\u{1}16\u{1}k",
            "\u{1}01\u{1}k",
            "\u{1}0\u{1}k",
            "\u{1}1\u{1}",
            "\u{1}1k",
            "\u{1}1\u{1}a\u{1}b",
            "a\u{1}b",
        ] {
            assert!(
                serde_json::from_value::<SessionId>(serde_json::Value::String(bad.into())).is_err(),
                "{bad:?} decoded"
            );
        }
        assert!(SessionId::db_start(0) > SessionId::in_db(15, k.clone()));
        assert!(SessionId::db_start(0) < k);
    }

    #[test]
    fn route_suffix_is_stripped() {
        let a = SessionId::parse("ABC.node1").unwrap();
        let b = SessionId::parse("ABC.node2").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "ABC");
        assert_eq!(SessionId::parse(".node1"), Err(IdError::Empty));
        assert_eq!(SessionId::parse("a/b"), Err(IdError::BadChar));
        assert_eq!(SessionId::parse("a b"), Err(IdError::BadChar));
        assert!(SessionId::parse(&"x".repeat(257)).is_err());
        assert!(SessionId::parse("spring:session:1").is_ok());
    }

    #[test]
    fn debug_never_shows_the_id() {
        let id = SessionId::parse("SECRETSESSION").unwrap();
        assert!(!format!("{id:?}").contains("SECRET"));
        assert_eq!(id.short().len(), 8);
    }

    #[test]
    fn routes() {
        assert!(JvmRoute::parse("node1").is_ok());
        assert!(JvmRoute::parse("a").is_ok());
        assert!(JvmRoute::parse("Node1").is_err());
        assert!(JvmRoute::parse("1node").is_err());
        assert!(JvmRoute::parse("").is_err());
        assert!(JvmRoute::parse("abcdefghijklmnopq").is_err());
        assert!(JvmRoute::parse("abcdefghijklmnop").is_ok());
    }
}
