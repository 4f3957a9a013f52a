//! The member file (YAML) as an operator could write it, or as anything
//! else passed by mistake: parsing never panics, and what it accepts obeys
//! the rules (unique names, receiver addresses and jvmRoutes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::membership::MemberFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mf) = MemberFile::parse(text, "members.yaml") {
        assert!(!mf.members.is_empty());
        assert!(mf.validate("again").is_ok(), "accepted but not valid");
        let mut names = mf.names();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), mf.members.len(), "duplicate names accepted");
    }
});
