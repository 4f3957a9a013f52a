//! Prints the SessionCluster CustomResourceDefinition as YAML (committed under `crds/`).
use kube::CustomResourceExt;

fn main() -> anyhow::Result<()> {
    print!(
        "{}",
        serde_yaml::to_string(&sessionmesh_api::SessionCluster::crd())?
    );
    Ok(())
}
