#!/usr/bin/env bash
# Copies the generated CRDs (crds/, written by `cargo run -p moe-operator --bin crdgen`) into the
# chart's crds/ folder. helm/test.sh fails while they differ.
set -euo pipefail
cd "$(dirname "$0")/.."
for f in crds/*.yaml; do
  grep -q '^kind: CustomResourceDefinition' "$f" || { echo "$f is not a CRD (empty or being regenerated?): not copied" >&2; exit 1; }
done
rm -f helm/moe-operator/crds/*.yaml
cp crds/*.yaml helm/moe-operator/crds/
echo "synced: $(ls crds/*.yaml | tr '\n' ' ')"
