#!/bin/sh
# Used inside the `lock` build stage of every stage image:
#   lock-requirements.sh "<pipenv categories>" OUTDIR
# 1. `pipenv verify`: Pipfile.lock's hash must match Pipfile, the same check as
#    `pipenv install --deploy`, so a stale lock fails the image build here.
# 2. `pipenv requirements --hash`: the exact pins of those categories, with hashes,
#    split in two files so the big, shared part gets its own cacheable layer:
#      OUTDIR/torch.txt  torch, torchvision, triton and the CUDA wheels (empty for
#                        stages without torch); byte-identical for train, evaluate
#                        and app, so their images share one ~6 GB layer
#      OUTDIR/stage.txt  everything else the stage needs
#    The final stage installs both with `pip install --no-deps --require-hashes`,
#    i.e. exactly the lock, no resolver.
set -eu
cats=$1
out=$2
mkdir -p "$out"
pipenv verify
# the lock's [[source]] is the literal ${PYPI_URL}; the index is given to pip separately
PYPI_URL=unused pipenv requirements --hash --categories "$cats" | grep -v '^-i ' > "$out/all.txt"
heavy='^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=='
grep -E "$heavy" "$out/all.txt" > "$out/torch.txt" || true
grep -vE "$heavy" "$out/all.txt" > "$out/stage.txt"
echo "lock: categories '$cats': $(wc -l < "$out/torch.txt") torch/CUDA pins, $(wc -l < "$out/stage.txt") other pins"
