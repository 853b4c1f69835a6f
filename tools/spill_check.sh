#!/usr/bin/env bash
# Fails when a SIMD matrix-product kernel stores a vector register to the stack: in the
# micro-kernels a spilled accumulator turns each FMA into an FMA and a store, and the product
# runs at a third of the FMA peak (the 12 x 32 AVX-512 tile did so until aba75c3, unseen by
# every test). Checks the optimised code of the `vitrs` library as the release profile builds
# it for baseline x86-64 (every rung's kernels are in it, whatever this CPU runs), so the
# result does not depend on the host.
#
#   tools/spill_check.sh [REGEX]
#
# REGEX (an awk regular expression over the demangled function names) picks other functions
# to check; the default is the tiles and the blocked products of the AVX2 and AVX-512 rungs.
# Needs objdump (binutils). Builds `cargo build --release --workspace --lib` first.
set -euo pipefail
cd "$(dirname "$0")/.."
funcs="${1:-sgemm::(run_tile::(wide|narrow)|gemm_avx512|gemm_avx2)>}"
if [ "$(uname -m)" != x86_64 ]; then
  echo "spill_check: the kernels checked are x86-64 ones; nothing to check on $(uname -m)"
  exit 0
fi
cargo build --release --workspace --lib --quiet
rlib="${CARGO_TARGET_DIR:-target}/release/libvitrs.rlib"
[ -f "$rlib" ] || { echo "spill_check: $rlib not found after the build" >&2; exit 2; }
objdump -d --no-show-raw-insn -C "$rlib" | awk -v funcs="$funcs" '
  /^[0-9a-f]+ <.*>:$/ { name = $2; checked = (name ~ funcs); if (checked) seen++; next }
  # A 256- or 512-bit register stored to a stack slot: how LLVM spills (the edge tiles write
  # their accumulators through a pointer into a buffer instead).
  checked && /vmovaps +%[yz]mm[0-9]+,(-?0x[0-9a-f]+)?\(%rsp\)/ { bad[name]++ }
  END {
    if (!seen) { print "spill_check: no function matches " funcs > "/dev/stderr"; exit 2 }
    n = 0
    for (f in bad) { printf "spill_check: %d vector stores to the stack in %s\n", bad[f], f; n++ }
    if (n) { print "spill_check: a kernel spills (see docs/perf.md, 2026-12-04 evening)"; exit 1 }
    printf "spill_check: %d functions, no vector register spilled\n", seen
  }'
