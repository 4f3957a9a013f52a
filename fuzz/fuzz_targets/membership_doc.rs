//! The operator's membership document as the sidecar reads it from the
//! ConfigMap (YAML, then the same validation as a file).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::membership::MemberFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(doc) = serde_yaml::from_str::<sessionmesh_api::MembershipDoc>(text) else {
        return;
    };
    if let Ok(mf) = MemberFile::from_doc(&doc, "configmap fuzz/members") {
        assert!(mf.validate("again").is_ok(), "accepted but not valid");
        assert!(
            mf.leaving.iter().all(|n| mf.get(n).is_some()),
            "a leaving member not in the list"
        );
    }
});
