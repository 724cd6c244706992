#!/usr/bin/env bash
# Download the reference side-information models (SimCLR ResNet-50, 128-d output, TorchScript)
# into checkpoints/. Needs network access; fails with a clear message without it.
# Offline, train a label-free side-information model with this project instead.
set -euo pipefail
dest="${1:-checkpoints}"
base="https://devpubs.s3.amazonaws.com/ml-research/models/fct"
mkdir -p "$dest"
for name in imagenet_250_simclr.pt imagenet_500_simclr.pt imagenet_1000_simclr.pt; do
  if [ -s "$dest/$name" ]; then
    echo "$dest/$name already present"
    continue
  fi
  tmp="$dest/.$name.part"
  if command -v curl >/dev/null 2>&1; then
    fetch=(curl -fsSL --retry 2 --connect-timeout 15 -o "$tmp" "$base/$name")
  else
    fetch=(wget -q --timeout=15 -O "$tmp" "$base/$name")
  fi
  if ! "${fetch[@]}"; then
    rm -f "$tmp"
    echo "error: could not download $base/$name (offline?). Train a label-free side-information model instead." >&2
    exit 2
  fi
  mv "$tmp" "$dest/$name"   # only complete files get the final name
  echo "downloaded $dest/$name"
done
