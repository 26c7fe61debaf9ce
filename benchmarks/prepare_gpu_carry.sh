#!/usr/bin/env bash
# Prepare what a GPU machine without internet needs next to the repo (both folders are git-ignored):
#   .gpu/  copies of ../shared/llama2-tokenizer and ../shared/lima (never committed: licences)
#   .whl/  wheels for packages its image lacks (bitsandbytes, jsonargparse and its signature extras, pytest for
#          benchmarks/gpu_test.sh), for CPython 3.12
# Then pass carry=[".gpu", ".whl"] to the device run; the GPU scripts install .whl/*.whl into /tmp/site themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
mkdir -p .gpu .whl
cp -r "$shared/llama2-tokenizer" "$shared/lima" .gpu/
chmod -R u+w .gpu
for pkg in bitsandbytes==0.50.2 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
           pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$pkg"
done
du -sh .gpu .whl
