//! Prints the MoEDeployment CRD as YAML: `cargo run -p moe-operator --bin crdgen > crds/moedeployment.yaml`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", moe_operator::crd_yaml()?);
    Ok(())
}
