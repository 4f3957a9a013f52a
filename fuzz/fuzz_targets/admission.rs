//! The webhook's AdmissionReview handler on arbitrary bodies. The API server
//! it would ask is unreachable, so a well-formed review of an annotated pod
//! fails closed; anything else gets an answer, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_operator::webhook::{Admission, InjectConfig};
use std::sync::OnceLock;

struct Hook {
    rt: tokio::runtime::Runtime,
    admission: Admission,
}

fn hook() -> &'static Hook {
    static H: OnceLock<Hook> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt.block_on(async {
            let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
            kube::Client::try_from(cfg).expect("client")
        });
        let admission = Admission::new(
            client,
            InjectConfig {
                image: "sessionmesh:fuzz".into(),
                native_supported: true,
                reservation: std::time::Duration::from_secs(10),
            },
        );
        Hook { rt, admission }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = hook();
    let answer = h.rt.block_on(h.admission.review(data));
    assert!(
        answer.is_object(),
        "the answer is not a JSON object: {answer}"
    );
});
