//! Prints the SessionCluster CustomResourceDefinition as YAML (committed under `crds/`).
fn main() -> anyhow::Result<()> {
    print!("{}", serde_yaml::to_string(&sessionmesh_api::crd())?);
    Ok(())
}
