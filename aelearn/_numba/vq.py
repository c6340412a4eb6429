"""Numba CPU backend of the nearest-codebook search of vector quantisation (VQ-VAE).

One entry point, with the meaning fixed by the backend contract (csrc/vq.cpp):

* ``vq_nearest(z, codebook)`` -> ``(indices: int64 [N], sqdist: [N])`` for z ``[N, D]`` and codebook
  ``[K, D]``, contiguous CPU tensors of one dtype (float32 or float64): ``indices_n = argmin_k d_nk``
  with ``d_nk = sum_d (z_nd - codebook_kd)^2`` in float64 (ties to the lowest k) and
  ``sqdist_n = d_n,indices_n`` rounded to the input dtype.

How it is evaluated:

* The codebook is centred once on its float64 mean s and rounded to the input dtype,
  ``e'_k = fl(e_k - s)``, packed into ``[D, _CODES]`` panels (`aelearn._numba._tiles.column_panels`)
  with its squared norms. Centring keeps the norms near the distances, so ``||e'||^2 - 2 z'.e'``
  cancels little. Only the first copy of codes that occur several times is packed
  (`_distinct_codes`): copies are never the answer, and their equal scores would defeat the
  certification below for every row near them.
* Each parallel task owns ``_ROW_BLOCK`` rows of z, centres them into a small packed buffer (no
  ``N x D`` copy) and streams every code panel past them. The hot loop is one LLVM-level register
  tile (`_search_tile`): ``_TILE_ROWS`` rows x ``_TILE_VECTORS`` vectors of codes of dot products
  accumulated over all of D in registers, turned into scores ``s = ||e'_k||^2 - 2 z'.e'_k`` in the
  input dtype and folded into a per-row, per-lane running best / best code / second best. A lane sees
  its codes in increasing order and takes a new best only on a strict <, so equal scores keep the
  lowest code; the lanes are merged per row at the end of the task.
* Certification: with u the unit roundoff, ``A_n = ||z'_n||^2 + max_k ||e'_k||^2`` and
  ``delta_n = (2 D + 16) u A_n`` bounding ``|(||z'_n||^2 + s_nk) - d_nk|``, a row whose second-best
  score exceeds the best by more than ``2 delta_n`` has a provably unique nearest code. Other rows
  (near-ties, codes equal only after centring and rounding, overflowed scores) are searched again
  by direct float64 differences of the original inputs. ``sqdist`` is always recomputed that way for
  the chosen code.
* Nothing ``N x K`` exists: the extra memory is the outputs, two ``K x D`` copies of the codebook
  (centred rows, panels), O(K) for the duplicate search and per-task buffers of ``_ROW_BLOCK`` rows.
"""

import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from aelearn._numba._common import REDUCE_FLAGS as _REDUCE_FLAGS
from aelearn._numba._common import checked_numpy as _checked_numpy
from aelearn._numba._common import jit as _jit
from aelearn._numba._tiles import BLOCK as _CODES
from aelearn._numba._tiles import column_panels as _column_panels
from aelearn._numba._tiles import squared_norms as _squared_norms

__all__ = ["vq_nearest"]

# Register tile of `_search_tile`: _TILE_ROWS rows x _TILE_VECTORS vectors of _VECTOR_BYTES bytes of
# codes. 256-bit vectors: 512-bit ones give no more FMA throughput on AMD Zen 4 (measured), and on
# Intel cores that LLVM tunes for 256 bits it would split them into pairs, doubling the registers the
# tile needs. With AVX-512's 32 vector registers the tile keeps 6 x 4 = 24 accumulators plus the 4
# code vectors of the current d and a broadcast row value (about 100 GFLOP/s per Zen 4 core in
# float32 at D = 64, measured; 6 x 2 reached 86); with the 16 registers of AVX2 (or fewer
# elsewhere) 6 x 2 = 12 accumulators.
_VECTOR_BYTES = 32
_TILE_ROWS = 6
_TILE_VECTORS = 4 if llvm_binding.get_host_cpu_features().get("avx512f", False) else 2
# Rows per parallel task, a multiple of _TILE_ROWS: their packed values (96 x D) and lane states stay
# in L1/L2 while every code panel streams past them.
_ROW_BLOCK = 96
# Lane codes are int32 inside the tile.
_MAX_CODES = 2**31 - 1


@intrinsic
def _search_tile(typingctx, packed, row0, panel, col0, norms, code0, best, best_code, second):
    """Score ``_TILE_ROWS`` packed rows against one tile of codes and fold the scores into their lanes.

    packed: ``[>= row0 + _TILE_ROWS, D]`` centred rows; panel: ``[D, _CODES]`` centred codes (column c has
    the id ``code0 + c``); the tile is the panel's columns ``[col0, col0 + _TILE_VECTORS * lanes)``, with
    lanes = ``_VECTOR_BYTES / itemsize``; norms: ``[_CODES]``, ``||e'||^2`` of the panel's codes (+inf
    for padding columns, whose scores then never win); best, second: ``[>= row0 + _TILE_ROWS, lanes]``
    in the dtype of packed, best_code: int32 of that shape, the running state of each row's lanes. All
    arrays C-contiguous (unchecked: the caller guarantees the shapes).

    Emitted as LLVM vector code because numba's loops cannot keep a matrix-product tile in registers:
    the vectoriser only works on innermost loops, so an accumulator tile would be loaded and stored
    for every few FMAs. Here the ``_TILE_ROWS x _TILE_VECTORS`` accumulators live in registers across
    the whole loop over D (dot products summed in d order, with FMA); each step loads the tile's code
    vectors once and broadcasts one value per row. The scores ``fma(dot, -2, norm)`` then update
    each lane with a strict ``<`` (a NaN score never wins nor becomes a second best).
    """
    float_types = (types.float32, types.float64)
    arrays = (packed, panel, norms, best, best_code, second)
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
        return None
    if packed.dtype not in float_types or best_code.dtype != types.int32:
        return None
    if not all(isinstance(i, types.Integer) for i in (row0, col0, code0)):
        return None
    if any(a.dtype != packed.dtype for a in (panel, norms, best, second)):
        return None
    signature = types.void(packed, row0, panel, col0, norms, code0, best, best_code, second)

    def codegen(context, builder, signature, args):
        arg_types = signature.args
        packed_a, panel_a, norms_a, best_a, code_a, second_a = (
            context.make_array(arg_types[i])(context, builder, args[i]) for i in (0, 2, 4, 6, 7, 8)
        )
        row0_v, col0_v, code0_v = (context.cast(builder, args[i], arg_types[i], types.intp) for i in (1, 3, 5))
        intp = context.get_value_type(types.intp)
        element = context.get_value_type(arg_types[0].dtype)
        itemsize = context.get_abi_sizeof(element)
        lanes = _VECTOR_BYTES // itemsize
        vector = ir.VectorType(element, lanes)
        int32 = ir.IntType(32)
        int_vector = ir.VectorType(int32, lanes)
        fma_function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f{8 * itemsize}")
        depth = cgutils.unpack_tuple(builder, packed_a.shape, 2)[1]

        def offset(data, index):
            return builder.gep(data, [index])

        def constant(value):
            return ir.Constant(intp, value)

        def vector_pointer(data, index, vector_type=vector):
            return builder.bitcast(offset(data, index), vector_type.as_pointer())

        def splat(value, vector_type):
            first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(int32, 0))
            return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined),
                                          ir.Constant(int_vector, [0] * lanes))

        # Accumulators as stack slots: LLVM's mem2reg turns them into registers carried by the loop.
        accumulators = [
            [cgutils.alloca_once_value(builder, ir.Constant(vector, [0.0] * lanes)) for _ in range(_TILE_VECTORS)]
            for _ in range(_TILE_ROWS)
        ]
        rows = [builder.add(row0_v, constant(r)) for r in range(_TILE_ROWS)]
        row_data = [offset(packed_a.data, builder.mul(row, depth)) for row in rows]
        with cgutils.for_range(builder, depth) as loop:
            d = loop.index
            panel_row = offset(panel_a.data, builder.add(builder.mul(d, constant(_CODES)), col0_v))
            codes = [builder.load(vector_pointer(panel_row, constant(v * lanes)), align=itemsize)
                     for v in range(_TILE_VECTORS)]
            for r in range(_TILE_ROWS):
                value = splat(builder.load(offset(row_data[r], d)), vector)
                for v in range(_TILE_VECTORS):
                    slot = accumulators[r][v]
                    builder.store(builder.call(fma_function, [value, codes[v], builder.load(slot)]), slot)

        minus_two = ir.Constant(vector, [-2.0] * lanes)
        lane_offsets = ir.Constant(int_vector, list(range(lanes)))
        first_code = builder.add(code0_v, col0_v)
        norm_vectors = [builder.load(vector_pointer(norms_a.data, builder.add(col0_v, constant(v * lanes))),
                                     align=itemsize) for v in range(_TILE_VECTORS)]
        code_vectors = [
            builder.add(splat(builder.trunc(builder.add(first_code, constant(v * lanes)), int32), int_vector),
                        lane_offsets)
            for v in range(_TILE_VECTORS)
        ]
        for r in range(_TILE_ROWS):
            state = builder.mul(rows[r], constant(lanes))
            best_pointer = vector_pointer(best_a.data, state)
            second_pointer = vector_pointer(second_a.data, state)
            code_pointer = vector_pointer(code_a.data, state, int_vector)
            best_v = builder.load(best_pointer, align=itemsize)
            second_v = builder.load(second_pointer, align=itemsize)
            code_v = builder.load(code_pointer, align=4)
            # Vectors in increasing code order, so a lane's strict < keeps its lowest code on ties.
            for v in range(_TILE_VECTORS):
                score = builder.call(fma_function, [builder.load(accumulators[r][v]), minus_two, norm_vectors[v]])
                better = builder.fcmp_ordered("<", score, best_v)
                # The value that drops out of first place (the old best, or the score itself) is a
                # candidate for second place.
                candidate = builder.select(better, best_v, score)
                second_v = builder.select(builder.fcmp_ordered("<", candidate, second_v), candidate, second_v)
                best_v = builder.select(better, score, best_v)
                code_v = builder.select(better, code_vectors[v], code_v)
            builder.store(best_v, best_pointer, align=itemsize)
            builder.store(second_v, second_pointer, align=itemsize)
            builder.store(code_v, code_pointer, align=4)
        return context.get_dummy_value()

    return signature, codegen


@_jit(fastmath=_REDUCE_FLAGS)
def _squared_distance(a, b):
    """``sum_d (a_d - b_d)^2`` in float64 by direct differences; a, b: ``[D]``."""
    acc = 0.0
    for d in range(a.shape[0]):
        diff = np.float64(a[d]) - np.float64(b[d])
        acc += diff * diff
    return acc


@_jit(fastmath=_REDUCE_FLAGS)
def _exact_nearest(row, codebook):
    """argmin_k of `_squared_distance` (row ``[D]``, codebook ``[K, D]``), ties to the lowest k."""
    best = np.inf
    code = 0
    for k in range(codebook.shape[0]):
        dist = _squared_distance(row, codebook[k])
        if dist < best:
            best = dist
            code = k
    return code


@_jit(fastmath=_REDUCE_FLAGS)
def _distinct_codes(codebook):
    """Indices (int64, increasing) of the codes that equal no earlier code; codebook: ``[K, D]``.

    Equal codes (== in every component) have bit-identical float64 distances to every row, so the
    argmin is always the first of them; searching only the first copies gives the same answer. Without
    this, every row nearest to a duplicated code would tie in the scores and fall back to the exact
    search (a codebook whose dead codes were reset to one value made that 3x slower than cdist).
    Codes are grouped by a float64 key (a fixed weighted sum of the components, equal for equal codes)
    sorted stably, and compared exactly within a run of equal keys.
    """
    k, dim = codebook.shape
    weights = 1.0 + (np.arange(dim) * 0.6180339887498949) % 1.0
    keys = np.empty(k)
    for j in range(k):
        key = 0.0
        for d in range(dim):
            key += weights[d] * codebook[j, d]
        keys[j] = key
    order = np.argsort(keys, kind="mergesort")
    duplicate = np.zeros(k, np.bool_)
    start = 0
    while start < k:
        end = start + 1
        while end < k and keys[order[end]] == keys[order[start]]:
            end += 1
        # Within the run indices increase, so each code that is no copy claims its later copies.
        for a in range(start, end):
            if not duplicate[order[a]]:
                first = codebook[order[a]]
                for b in range(a + 1, end):
                    if not duplicate[order[b]] and np.all(codebook[order[b]] == first):
                        duplicate[order[b]] = True
        start = end
    return np.nonzero(~duplicate)[0]


@_jit(fastmath=_REDUCE_FLAGS)
def _centred_codebook(codebook, codes):
    """``(shift [D] float64, panels [n_blocks, D, _CODES], norm_panels [n_blocks, _CODES], max_norm)``.

    codebook: ``[K, D]``; codes: int64 ``[K']``, the codes to pack (panel column j holds code codes[j]).
    shift: the float64 mean of all codes; panels: the centred codes ``fl(e_k - shift)`` in the input
    dtype, packed by `_column_panels` (padding columns 0); norm_panels: their squared norms, summed in
    float64 and rounded once, +inf in padding columns; max_norm: the largest of those norms, float64.
    """
    k, dim = codebook.shape
    shift = np.zeros(dim)
    for j in range(k):
        for d in range(dim):
            shift[d] += codebook[j, d]
    shift /= k
    centred = np.empty((codes.shape[0], dim), codebook.dtype)
    for j in range(codes.shape[0]):
        for d in range(dim):
            centred[j, d] = codebook[codes[j], d] - shift[d]
    panels = _column_panels(centred)
    norms = _squared_norms(centred)
    norm_panels = np.full((panels.shape[0], _CODES), np.inf, codebook.dtype)
    max_norm = 0.0
    for j in range(codes.shape[0]):
        norm_panels[j // _CODES, j % _CODES] = norms[j]
        max_norm = max(max_norm, np.float64(norms[j]))
    return shift, panels, norm_panels, max_norm


@_jit(fastmath=_REDUCE_FLAGS)
def _merge_lanes(best, best_code, second, row):
    """``(b1, code, b2)`` of one row from its lane states (``[rows, lanes]`` arrays).

    b1: the lowest score, code: the lowest code id reaching it (lanes hold different codes, so equal
    bests are broken by id), b2: the lowest score of every other code, float64: the lanes' second
    bests and the other lanes' bests (equal to b1 when two codes share it).
    """
    b1 = best[row, 0]
    code = best_code[row, 0]
    lane = 0
    for other in range(1, best.shape[1]):
        value = best[row, other]
        if value < b1 or (value == b1 and best_code[row, other] < code):
            b1 = value
            code = best_code[row, other]
            lane = other
    b2 = np.inf
    for other in range(best.shape[1]):
        b2 = min(b2, np.float64(second[row, other]))
        if other != lane:
            b2 = min(b2, np.float64(best[row, other]))
    return np.float64(b1), code, b2


@_jit(parallel=True, fastmath=_REDUCE_FLAGS)
def _search(z, codebook):
    """``(indices int64 [N], sqdist [N], exact_rows)``: the op's outputs for z ``[N, D]`` and codebook
    ``[K, D]`` (one dtype, C-contiguous, K >= 1, D >= 1) and how many rows the certification sent to
    the exact float64 search."""
    n, dim = z.shape
    dtype = z.dtype
    lanes = _VECTOR_BYTES // z.itemsize
    tile_codes = _TILE_VECTORS * lanes
    codes = _distinct_codes(codebook)
    shift, panels, norm_panels, max_norm = _centred_codebook(codebook, codes)
    # |(||z'||^2 + s_nk) - d_nk| <= (2 D + 16) u A_n: the roundings of the centring, of the D-term dot
    # product and norms, and of the score's additions, each at most u times a multiple of A_n.
    bound_factor = (2 * dim + 16) * 0.5 * np.finfo(dtype).eps
    indices = np.empty(n, np.int64)
    sqdist = np.empty(n, dtype)
    n_tasks = -(-n // _ROW_BLOCK)
    exact_rows = np.zeros(n_tasks, np.int64)
    for task in prange(n_tasks):
        # prange indices may be unsigned; mixing them with signed ints would promote to float64.
        row0 = np.int64(task) * _ROW_BLOCK
        rows = min(_ROW_BLOCK, n - row0)
        # Rows past `rows` stay 0 and are scored with the last tile's group, then ignored.
        packed = np.zeros((_ROW_BLOCK, dim), dtype)
        packed_sq = np.zeros(_ROW_BLOCK)
        for r in range(rows):
            for d in range(dim):
                value = dtype.type(z[row0 + r, d] - shift[d])
                packed[r, d] = value
                packed_sq[r] += np.float64(value) * np.float64(value)
        best = np.full((_ROW_BLOCK, lanes), np.inf, dtype)
        second = np.full((_ROW_BLOCK, lanes), np.inf, dtype)
        best_code = np.zeros((_ROW_BLOCK, lanes), np.int32)
        for block in range(panels.shape[0]):
            panel = panels[block]
            norms = norm_panels[block]
            # Tiles of a panel in column order, all rows per tile: every row meets its codes in
            # increasing order, and the tile's codes stay in L1 across the row groups.
            for col0 in range(0, _CODES, tile_codes):
                for group in range(0, rows, _TILE_ROWS):
                    _search_tile(packed, group, panel, col0, norms, block * _CODES, best, best_code, second)
        for r in range(rows):
            b1, column, b2 = _merge_lanes(best, best_code, second, r)
            code = codes[column]
            row = z[row0 + r]
            # Also false when b1 or b2 is inf or NaN (overflow in the input dtype).
            if not b2 - b1 > 2.0 * bound_factor * (packed_sq[r] + max_norm):
                code = _exact_nearest(row, codebook)
                exact_rows[task] += 1
            indices[row0 + r] = code
            sqdist[row0 + r] = _squared_distance(row, codebook[code])
    return indices, sqdist, exact_rows.sum()


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64 [N], sqdist [N])``: the nearest code of every row of z and its squared distance.

    z: ``[N, D]``, codebook: ``[K, D]``, contiguous CPU tensors of one dtype (float32 or float64), finite
    (checked by the wrapper), N >= 0, K >= 1, D >= 1. sqdist comes back in the input dtype.
    """
    if not isinstance(z, torch.Tensor) or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be a float32 or float64 tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    z_array = _checked_numpy(z, "z", (None, None), z.dtype)
    dim = z_array.shape[1]
    if dim < 1:
        raise ValueError(f"z must have at least one column, got shape {list(z.shape)}")
    codebook_array = _checked_numpy(codebook, "codebook", (None, dim), z.dtype)
    if not 1 <= codebook_array.shape[0] <= _MAX_CODES:
        raise ValueError(f"codebook must have between 1 and {_MAX_CODES} codes, got {codebook_array.shape[0]}")
    indices, sqdist, _ = _search(z_array, codebook_array)
    return torch.from_numpy(indices), torch.from_numpy(sqdist)
