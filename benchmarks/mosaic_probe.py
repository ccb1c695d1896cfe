"""Probe of the Mosaic-GPU grouped GEMM (jax_impl/kernels/mosaic_gemm.py) on a Hopper GPU: does each kernel form
compile and agree with an XLA reference, and how fast is it against a dense XLA (cuBLAS) GEMM of the same size.

Each form runs in its own try block, so one lowering error does not hide the others; errors print their traceback
tail. Usage (GPU host, repo root):  python benchmarks/mosaic_probe.py [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.kernels import mosaic_gemm as mg


def _ms(fn, *args, iters: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters * 1e3


def _offsets(M: int, E: int, key) -> jax.Array:
    """Uneven, sorted group boundaries with some empty experts."""
    cuts = np.sort(np.asarray(jax.random.randint(key, (E - 1,), 0, M)))
    return jnp.asarray(np.concatenate([[0], cuts, [M]]), jnp.int32)


def _reference(a_P, w, block_expert, w_t, bm, z_P=None, lb=None, lb_t=False, lora_scale=1.0, rows=None):
    """fp32 XLA product of the same bf16 operands, on `rows` of the padded layout."""
    f = jnp.float32
    e = jnp.repeat(block_expert, bm)[rows]
    W = jnp.swapaxes(w, 1, 2) if w_t else w
    out = jnp.einsum("pd,pdn->pn", a_P[rows].astype(f), W.astype(f)[jnp.maximum(e, 0)])
    if z_P is not None:
        LB = jnp.swapaxes(lb, 1, 2) if lb_t else lb
        out = out + lora_scale * jnp.einsum("pr,prn->pn", z_P[rows].astype(f), LB.astype(f)[jnp.maximum(e, 0)])
    return out, rows


def probe(name: str, M: int, D: int, N: int, E: int, R: int, *, w_t: bool, lora: bool, lb_t: bool = False,
          tiles: mg.MosaicTiles = mg.DEFAULT_TILES, smem_transpose: bool | None = None, timed: bool = False,
          interpret: bool = False) -> dict:
    ks = jax.random.split(jax.random.key(0), 6)
    dt = jnp.float32 if interpret else jnp.bfloat16
    off = _offsets(M, E, ks[0])
    pad = mg.padded_rows(off, M, tiles.block_m)
    a = jax.random.normal(ks[1], (M, D), dt)
    a_P = jnp.take(a, pad.src_P, axis=0, mode="fill", fill_value=0)
    w = (jax.random.normal(ks[2], (E, N, D) if w_t else (E, D, N), dt) / np.sqrt(D)).astype(dt)
    z_P = lb = None
    if lora:
        z_P = jax.random.normal(ks[3], (a_P.shape[0], R), dt)
        lb = (jax.random.normal(ks[4], (E, N, R) if lb_t else (E, R, N), dt) / np.sqrt(R)).astype(dt)
    row = dict(name=name, M=M, D=D, N=N, E=E, R=R, w_t=w_t, lora=lora, lb_t=lb_t, tiles=tiles._asdict(),
               smem_transpose=smem_transpose)
    fn = jax.jit(lambda a_P, w, be, z_P, lb: mg.block_gemm(
        a_P, w, be, w_t=w_t, z_P=z_P, lb=lb, lb_t=lb_t, lora_scale=2.0, tiles=tiles, interpret=interpret,
        smem_transpose=smem_transpose))
    try:
        got = fn(a_P, w, pad.block_expert, z_P, lb)
        # big shapes: check 512 random padded rows (a per-row weight gather of every row would need TBs)
        # only rows of blocks that hold rows: blocks of padding only (expert -1) are never written (their contents
        # are whatever the buffer held), and grouped_gemm never reads them
        valid = np.flatnonzero(np.repeat(np.asarray(pad.block_expert) >= 0, tiles.block_m))
        if len(valid) > 4096:
            valid = np.asarray(jax.random.choice(ks[5], valid, (512,), replace=False))
        rows = jnp.asarray(valid)
        want, rows = _reference(a_P, w, pad.block_expert, w_t, tiles.block_m, z_P, lb, lb_t, 2.0, rows)
        err = float(jnp.max(jnp.abs(got[rows] - want)) / (jnp.max(jnp.abs(want)) + 1e-9))
        row["rel_max_err"] = err
        if timed:
            ms = _ms(fn, a_P, w, pad.block_expert, z_P, lb)
            flops = 2 * M * D * N + (2 * M * R * N if lora else 0)
            dense = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
            d_ms = _ms(dense, a, w[0] if not w_t else w[0].T)
            row.update(ms=ms, tflops=flops / ms / 1e9, dense_ms=d_ms, dense_tflops=2 * M * D * N / d_ms / 1e9,
                       padded_rows=int(a_P.shape[0]))
        print(f"OK   {name:28s} {json.dumps({k: row[k] for k in row if k not in ('name',)})}", flush=True)
    except Exception as e:  # noqa: BLE001 - the probe reports every form's failure, not only the first
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"FAIL {name}\n" + "".join(traceback.format_exception(e)[-6:])[-4000:], flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--interpret", action="store_true", help="the small forms only, in the Mosaic-GPU interpreter")
    args = ap.parse_args()
    print(jax.__version__, jax.devices(), flush=True)
    T = mg.MosaicTiles
    small = dict(M=300, D=128, N=192, E=5, R=16, interpret=args.interpret)
    rows = [
        probe("small plain", **small, w_t=False, lora=False),
        probe("small plain bm64", **small, w_t=False, lora=False, tiles=T(64, 128, 2)),
        probe("small w_t xla", **small, w_t=True, lora=False, smem_transpose=False),
        probe("small lora", **small, w_t=False, lora=True),
        probe("small lora lb_t xla", **small, w_t=True, lora=True, lb_t=True, smem_transpose=False),
    ]
    if not args.interpret:
        # the transposed SMEM view: GPU only (the interpreter cannot run wgmma on it, and a failed interpreted
        # kernel leaves its barriers allocated for the next one)
        rows.append(probe("small w_t smem", **small, w_t=True, lora=False, smem_transpose=True))
        rows.append(probe("small lora lb_t smem", **small, w_t=True, lora=True, lb_t=True, smem_transpose=True))
        # Qwen3-30B-A3B, T=16384, K=8: gate_up (H -> 2I with LoRA), down (I -> H), dh (H -> I, W transposed);
        # gpt-oss-20b T=16384, K=4: gate_up (H -> 2I)
        for tiles in (T(128, 64, 6), T(128, 128, 4)):
            rows.append(probe(f"qwen gate_up T16K {tuple(tiles)}", 131072, 2048, 1536, 128, 64, w_t=False,
                              lora=True, tiles=tiles, timed=True))
        rows.append(probe("qwen down T16K", 131072, 768, 2048, 128, 64, w_t=False, lora=True, timed=True,
                          tiles=T(128, 64, 6)))
        rows.append(probe("qwen dh T16K smem_t", 131072, 2048, 768, 128, 64, w_t=True, lora=True, lb_t=True,
                          timed=True))
        rows.append(probe("oss gate_up T16K", 65536, 2880, 5760, 32, 64, w_t=False, lora=True, timed=True))
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
