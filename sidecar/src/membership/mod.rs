//! Static membership: the YAML member file and its validation.
//!
//! ```yaml
//! cluster: shop
//! members:
//!   - name: node1
//!     address: 127.0.0.1:4001
//!     jvmRoute: node1
//! ```
//! Invariants of a valid file: names, addresses and jvmRoutes are unique;
//! jvmRoutes match `^[a-z][a-z0-9]{0,15}$`. Errors name the offending field
//! (`members[2].address: ...`), and a bad file never replaces a good one.

pub mod kube;

use crate::core::identity::JvmRoute;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MemberFile {
    pub cluster: String,
    pub members: Vec<MemberSpec>,
    /// Members the operator marked as leaving (terminating pods); never set by a file.
    #[serde(skip)]
    pub leaving: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MemberSpec {
    pub name: String,
    /// Replication address:port (the Receiver of Tomcat's server.xml).
    pub address: SocketAddr,
    pub jvm_route: String,
}

/// A member file that could not be used. Nothing was changed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{file}: {field}: {message}")]
pub struct MemberFileError {
    pub file: String,
    /// The offending field, as a path (`members[1].address`), or `.` for the file.
    pub field: String,
    pub message: String,
}

/// Replaces the text inside double quotes with `…`, and cuts what follows a
/// parser's `at line` position note short: an error names the field and the
/// kind of mistake, never the file's content.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for ch in message.chars() {
        match (ch, inside) {
            ('"', false) => {
                inside = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                inside = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    if inside {
        out.push('"');
    }
    out
}

/// Largest member file read: thousands of members fit in far less.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

impl MemberFile {
    pub fn parse(text: &str, file: &str) -> Result<Self, MemberFileError> {
        let err = |field: String, message: String| MemberFileError {
            file: file.to_owned(),
            field,
            message,
        };
        let de = serde_yaml::Deserializer::from_str(text);
        let mf: MemberFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let mut message = e.into_inner().to_string();
            // serde_yaml prefixes the path itself; keep the message short.
            if let Some(rest) = message.strip_prefix(&format!("{field}: ")) {
                message = rest.to_owned();
            }
            // The parser quotes what it found, which may be anything (a secret
            // file passed as the member file, say): keep it out of the logs.
            message = redact_quoted(&message);
            err(if field.is_empty() { ".".into() } else { field }, message)
        })?;
        mf.validate(file)?;
        Ok(mf)
    }

    /// The rules every member list obeys, whatever its source: a cluster
    /// name, at least one member, valid names and jvmRoutes, and no name,
    /// receiver address or jvmRoute used twice.
    pub fn validate(&self, file: &str) -> Result<(), MemberFileError> {
        let err = |field: String, message: String| MemberFileError {
            file: file.to_owned(),
            field,
            message,
        };
        let mf = self;
        if mf.cluster.is_empty() {
            return Err(err("cluster".into(), "must not be empty".into()));
        }
        if mf.members.is_empty() {
            return Err(err(
                "members".into(),
                "must list at least one member".into(),
            ));
        }
        let (mut names, mut addrs, mut routes) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, m) in mf.members.iter().enumerate() {
            if m.name.is_empty()
                || m.name.len() > 253
                || m.name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(err(
                    format!("members[{i}].name"),
                    format!("{:?} is not a valid member name", m.name),
                ));
            }
            if let Err(e) = JvmRoute::parse(&m.jvm_route) {
                return Err(err(format!("members[{i}].jvmRoute"), e.to_string()));
            }
            if m.address.port() == 0 {
                return Err(err(
                    format!("members[{i}].address"),
                    "port 0 is not a receiver port".into(),
                ));
            }
            if !names.insert(&m.name) {
                return Err(err(
                    format!("members[{i}].name"),
                    format!("duplicate member name {:?}", m.name),
                ));
            }
            if !addrs.insert(m.address) {
                return Err(err(
                    format!("members[{i}].address"),
                    format!("{} is already used by another member: every member needs its own receiver port", m.address),
                ));
            }
            if !routes.insert(&m.jvm_route) {
                return Err(err(
                    format!("members[{i}].jvmRoute"),
                    format!("duplicate jvmRoute {:?}", m.jvm_route),
                ));
            }
        }
        Ok(())
    }

    /// Converts the operator's membership document (Kubernetes source) and
    /// validates it like a file.
    pub fn from_doc(
        doc: &sessionmesh_api::MembershipDoc,
        source: &str,
    ) -> Result<Self, MemberFileError> {
        let err = |field: String, message: String| MemberFileError {
            file: source.to_owned(),
            field,
            message,
        };
        let mut members = Vec::with_capacity(doc.members.len());
        let mut leaving = std::collections::BTreeSet::new();
        for (i, m) in doc.members.iter().enumerate() {
            let address = m.address.parse().map_err(|_| {
                err(
                    format!("members[{i}].address"),
                    format!("{:?} is not ip:port", m.address),
                )
            })?;
            members.push(MemberSpec {
                name: m.name.clone(),
                address,
                jvm_route: m.jvm_route.clone(),
            });
            if m.leaving {
                leaving.insert(m.name.clone());
            }
        }
        let mf = MemberFile {
            cluster: doc.cluster.clone(),
            members,
            leaving,
        };
        mf.validate(source)?;
        Ok(mf)
    }

    pub fn load(path: &Path) -> Result<Self, MemberFileError> {
        let file = path.display().to_string();
        let text = Self::read_text(path)?;
        Self::parse(&text, &file)
    }

    /// Reads the file's text, refusing one larger than `MAX_FILE_BYTES`
    /// before reading it. Errors name the file, never its content.
    pub fn read_text(path: &Path) -> Result<String, MemberFileError> {
        let file = path.display().to_string();
        let err = |message: String| MemberFileError {
            file: file.clone(),
            field: ".".into(),
            message,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| err(e.to_string()))?
            .len();
        if len > MAX_FILE_BYTES {
            return Err(err(format!(
                "the file is {len} bytes; a member file may have at most {MAX_FILE_BYTES}"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        String::from_utf8(bytes).map_err(|_| err("the file is not UTF-8 text".into()))
    }

    pub fn get(&self, name: &str) -> Option<&MemberSpec> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn a_file_that_is_not_a_member_file_is_refused_without_its_content() {
        let e = super::MemberFile::parse(
            "8f3c2a9b7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c4b3a\n",
            "secret",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(!e.is_empty());
        assert!(!e.contains("8f3c2a9b"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "cluster: shop\nmembers:\n  - name: node1\n    address: 127.0.0.1:4001\n    jvmRoute: node1\n  - name: node2\n    address: 127.0.0.1:4002\n    jvmRoute: node2\n";

    fn doc(members: &[(&str, &str, &str, bool)]) -> sessionmesh_api::MembershipDoc {
        sessionmesh_api::MembershipDoc {
            cluster: "shop".into(),
            members: members
                .iter()
                .map(
                    |(name, address, route, leaving)| sessionmesh_api::DocMember {
                        name: (*name).into(),
                        uid: format!("uid-{name}"),
                        address: (*address).into(),
                        jvm_route: (*route).into(),
                        ready: true,
                        leaving: *leaving,
                    },
                )
                .collect(),
        }
    }

    #[test]
    fn the_operators_document_is_validated_like_a_file_without_a_text_round_trip() {
        let mf = MemberFile::from_doc(
            &doc(&[
                ("a", "10.0.0.1:4000", "a", false),
                ("b", "10.0.0.2:4000", "b", true),
            ]),
            "configmap shop/web",
        )
        .expect("valid");
        assert_eq!(mf.names(), vec!["a".to_string(), "b".to_string()]);
        assert!(mf.leaving.contains("b") && !mf.leaving.contains("a"));
        let e = MemberFile::from_doc(
            &doc(&[
                ("a", "10.0.0.1:4000", "a", false),
                ("b", "10.0.0.1:4000", "b", false),
            ]),
            "configmap shop/web",
        )
        .expect_err("two members on one receiver");
        assert_eq!(e.field, "members[1].address");
        let e = MemberFile::from_doc(&doc(&[("a", "nowhere", "a", false)]), "cm")
            .expect_err("not ip:port");
        assert_eq!(e.field, "members[0].address");
        let e = MemberFile::from_doc(&doc(&[("a", "10.0.0.1:4000", "bad route!", false)]), "cm")
            .expect_err("bad route");
        assert_eq!(e.field, "members[0].jvmRoute");
    }

    #[test]
    fn parses_a_good_file() {
        let mf = MemberFile::parse(GOOD, "m.yaml").unwrap();
        assert_eq!(mf.members.len(), 2);
        assert_eq!(mf.get("node2").unwrap().address.port(), 4002);
    }

    fn field_of(text: &str) -> String {
        MemberFile::parse(text, "m.yaml").unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(&GOOD.replace("127.0.0.1:4002", "localhost-4002")),
            "members[1].address"
        );
        assert_eq!(
            field_of(&GOOD.replace("jvmRoute: node2", "jvmRoute: Node-2")),
            "members[1].jvmRoute"
        );
        assert_eq!(
            field_of(&GOOD.replace("4002", "4001")),
            "members[1].address"
        );
        assert_eq!(
            field_of(&GOOD.replace("jvmRoute: node2", "jvmRoute: node1")),
            "members[1].jvmRoute"
        );
        assert_eq!(
            field_of(&GOOD.replace("name: node2", "name: node1")),
            "members[1].name"
        );
        assert_eq!(
            field_of(&GOOD.replace("jvmRoute: node2", "jvmRoute: node2\n    colour: red")),
            "members[1].colour"
        );
        assert_eq!(field_of("cluster: x\nmembers: []\n"), "members");
        let e = MemberFile::parse(&GOOD.replace("4002", "4001"), "m.yaml").unwrap_err();
        assert!(e.to_string().contains("receiver port"), "{e}");
    }
}
