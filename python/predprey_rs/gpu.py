"""GPU mat-vec / mat-mat straight from the packed bytes, on any vendor, through wgpu (WGSL).

    from predprey_rs import gpu
    g = gpu.upload(packed)          # weights go to the GPU once
    y = pp.matvec(g, x)             # (K,) -> (N,) float32
    Y = pp.matmul(g, X)             # (B, K) -> (B, N) float32
    y8 = pp.matvec(g, x, activations="int8")   # int8 x, the CPU's rule and result (to ~1e-7)

One device is created lazily and shared. ``PREDPREY_GPU_ADAPTER`` picks the adapter: words that
must all appear (case-insensitive) in "backend device vendor description adapter_type", e.g.
``vulkan``, ``opengl llvmpipe``, ``nvidia``. ``PREDPREY_GPU_SUBGROUPS=0`` forces the
shared-memory kernel even where the adapter has subgroups. The kernel is
``shaders/predprey_gemv1.wgsl`` (``shaders/predprey_gemv.wgsl``, the first general one, with
PREDPREY_GPU_TUNE=fast=0), with ``reduce_subgroup.wgsl`` (adapters with the "subgroup" feature)
or ``reduce_workgroup.wgsl`` (all others); their header comments give the buffer layout.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import GpuUnavailableError, PackedMatrix, ShapeError, _activations_flag, _core

__all__ = ["GpuMatrix", "GpuUnavailableError", "adapter_info", "list_adapters", "upload"]

_R = _core.ROWS_PER_GROUP
_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer
_MAX_NB = 8  # batch rows per dispatch slice (the shader's ACC_N = 5 * GPW * NB <= 40)
_MAX_BATCH_ROWS = 256  # rows of X held on the GPU at once; larger batches run in slices

_BACKENDS = ("Vulkan", "Metal", "D3D12", "OpenGL")
_TYPE_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}


# --------------------------------------------------------------------------------------------
# shader sources


def shader_source(name: str) -> str:
    """The WGSL source of ``shaders/<name>``: from the source tree when running from a checkout
    (python/predprey_rs -> ../../shaders, so edits need no rebuild), else the copy embedded in
    the extension at build time (every wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "shaders", name)
    if os.path.isfile(path) and os.path.isfile(os.path.join(here, "..", "..", "Cargo.toml")):
        with open(path, encoding="utf-8") as f:
            return f.read()
    get = getattr(_core, "shader_source", None)
    if get is None:
        raise FileNotFoundError(f"WGSL shader {name!r}: this build of _core embeds no shaders and no source tree is here")
    return get(name)


# --------------------------------------------------------------------------------------------
# adapters and the device


def _wgpu():
    try:
        import wgpu  # noqa: PLC0415
    except ImportError as e:
        raise GpuUnavailableError(
            f"the GPU path needs wgpu-py (pip install 'predprey-rs[gpu]'); importing it failed: {e}"
        ) from e
    return wgpu


def _describe(adapter) -> dict:
    info = adapter.info
    feats = set(adapter.features)
    return {
        "backend": str(info["backend_type"]),
        "device": str(info["device"]),
        "vendor": str(info["vendor"]) or f"0x{int(info['vendor_id']):04x}",
        "adapter_type": str(info["adapter_type"]),
        "description": str(info["description"]),
        "subgroups": "subgroup" in feats,
        "shader_f16": "shader-f16" in feats,
        "timestamps": "timestamp-query" in feats,
        "max_storage_binding": int(adapter.limits["max-storage-buffer-binding-size"]),
    }


def _haystack(d: dict) -> str:
    return " ".join(str(d[k]) for k in ("backend", "device", "vendor", "description", "adapter_type")).lower()


def _enumerate():
    wgpu = _wgpu()
    try:
        adapters = wgpu.gpu.enumerate_adapters_sync()
    except Exception as e:  # a broken loader or driver: say so rather than crash
        raise GpuUnavailableError(f"wgpu could not enumerate adapters ({type(e).__name__}: {e})") from e
    return adapters


def list_adapters() -> list[dict]:
    """Every adapter wgpu sees on every backend (Vulkan, Metal, D3D12, OpenGL), described."""
    return [_describe(a) for a in _enumerate()]


def _pick(adapters, want: str | None):
    described = [(a, _describe(a)) for a in adapters]
    if not described:
        raise GpuUnavailableError(
            "wgpu found no adapter on any backend (tried " + ", ".join(_BACKENDS) + "). "
            "Install a GPU driver with Vulkan/Metal/D3D12/OpenGL support, or Mesa's software "
            "drivers (apt-get install mesa-vulkan-drivers) to run on the CPU."
        )
    if want:
        words = want.lower().split()
        hits = [(a, d) for a, d in described if all(w in _haystack(d) for w in words)]
        if not hits:
            seen = "; ".join(f"{d['backend']}: {d['device']} ({d['adapter_type']})" for _, d in described)
            raise GpuUnavailableError(f"PREDPREY_GPU_ADAPTER={want!r} matches no adapter; wgpu sees: {seen}")
        described = hits

    def rank(item):
        d = item[1]
        backend = d["backend"]
        return (_TYPE_RANK.get(d["adapter_type"], 4), 1 if backend == "OpenGL" else 0)

    return min(described, key=rank)


@dataclass
class _Ctx:
    """One wgpu device with its pipelines (cached by shader, constants) and layouts."""

    adapter: Any
    device: Any
    info: dict
    subgroups: bool
    timestamps: bool
    limits: dict
    pipelines: dict = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _layouts: dict = field(default_factory=dict)
    serial_poll: bool = False

    def __post_init__(self):
        # wgpu-py polls every device from a background thread while a map is pending. On the
        # OpenGL backend that thread's EGL make-current races the calling thread's and wgpu-hal
        # panics (EGL BadAccess, an abort). There the background poll is made inert and the
        # device is polled on the calling thread instead, so GL calls never overlap.
        if self.info["backend"] == "OpenGL":
            poller = getattr(self.device, "_poller", None)
            if poller is not None and hasattr(self.device, "_poll") and hasattr(poller, "_poll_func"):
                poller._poll_func = lambda block: time.sleep(0.0005) if block else None
                self.serial_poll = True

    def map_read(self, buf, size: int) -> memoryview:
        """Map `size` bytes of a MAP_READ buffer, copy them out and unmap."""
        mode = _wgpu().MapMode.READ
        if self.serial_poll:
            promise = buf.map_async(mode, 0, size)
            for _ in range(100000):
                if promise._thread_event.is_set():
                    break
                self.device._poll(True)
            promise.sync_wait()
        else:
            buf.map_sync(mode, 0, size)
        try:
            return buf.read_mapped(0, size)
        finally:
            buf.unmap()

    @property
    def variant(self) -> str:
        return "subgroup" if self.subgroups else "workgroup"

    @property
    def max_binding(self) -> int:
        return min(int(self.limits["max-storage-buffer-binding-size"]), int(self.limits["max-buffer-size"]))

    @property
    def max_wg_per_dim(self) -> int:
        return int(self.limits["max-compute-workgroups-per-dimension"])

    def layout(self, kinds: tuple[str, ...]):
        """Bind group layout + pipeline layout for bindings 0.. of the given kinds."""
        if kinds not in self._layouts:
            wgpu = _wgpu()
            entries = [
                {"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": k}}
                for i, k in enumerate(kinds)
            ]
            bgl = self.device.create_bind_group_layout(entries=entries)
            pl = self.device.create_pipeline_layout(bind_group_layouts=[bgl])
            self._layouts[kinds] = (bgl, pl)
        return self._layouts[kinds]

    def pipeline(self, shader: str, kinds: tuple[str, ...], constants: dict, reduce: bool = True,
                 entry: str = "main"):
        """Compute pipeline of ``shader`` (+ the reduction matching this device) for override
        ``constants`` and entry point ``entry``; cached by (shader, constants, entry)."""
        key = (shader, tuple(sorted(constants.items())), reduce, entry)
        p = self.pipelines.get(key)
        if p is None:
            src = shader_source(shader)
            if reduce:
                src += "\n" + shader_source(f"reduce_{self.variant}.wgsl")
            module = self.device.create_shader_module(code=src, label=shader)
            _, pl = self.layout(kinds)
            p = self.device.create_compute_pipeline(
                layout=pl,
                compute={"module": module, "entry_point": entry, "constants": dict(constants)},
                label=shader,
            )
            self.pipelines[key] = p
        return p

    def buffer(self, data: np.ndarray | bytes, usage) -> Any:
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        n = len(raw)
        pad = (-n) % 16 if n else 16  # WebGPU has no empty bindings
        if pad:
            raw = raw + bytes(pad)
        return self.device.create_buffer_with_data(data=raw, usage=usage)


_CTX: _Ctx | None = None
_CTX_LOCK = threading.Lock()


def _open(adapter, info: dict, subgroups: bool | None = None) -> _Ctx:
    feats = set(adapter.features)
    use_sg = "subgroup" in feats
    if subgroups is not None:
        use_sg = use_sg and subgroups
    elif os.environ.get("PREDPREY_GPU_SUBGROUPS", "").strip() in ("0", "no", "false", "off"):
        use_sg = False
    want = ["subgroup"] if use_sg else []
    if "timestamp-query" in feats:
        want.append("timestamp-query")
    al = adapter.limits
    names = (
        "max-storage-buffer-binding-size",
        "max-buffer-size",
        "max-storage-buffers-per-shader-stage",
        "max-compute-workgroup-storage-size",
        "max-compute-invocations-per-workgroup",
        "max-compute-workgroup-size-x",
        "max-compute-workgroups-per-dimension",
    )
    limits = {n: int(al[n]) for n in names if n in al}
    try:
        device = adapter.request_device_sync(required_features=want, required_limits=limits)
    except Exception:
        try:  # some drivers refuse their own maxima: fall back to the WebGPU defaults
            device = adapter.request_device_sync(required_features=want)
        except Exception as e:
            raise GpuUnavailableError(
                f"could not open a device on {info['device']} via {info['backend']}: {type(e).__name__}: {e}"
            ) from e
    dl = {n: int(device.limits[n]) for n in names}
    return _Ctx(adapter, device, info, use_sg, "timestamp-query" in want, dl)


def _context() -> _Ctx:
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            adapter, info = _pick(_enumerate(), os.environ.get("PREDPREY_GPU_ADAPTER") or None)
            _CTX = _open(adapter, info)
        return _CTX


def adapter_info() -> dict:
    """The adapter the GPU path uses: backend, device, vendor, adapter_type, description, and
    the kernel variant ("subgroup" or "workgroup"). Raises GpuUnavailableError without one."""
    ctx = _context()
    d = dict(ctx.info)
    d["kernel_variant"] = ctx.variant
    d["max_storage_binding"] = ctx.max_binding
    return d


# --------------------------------------------------------------------------------------------
# the packed matrix on the GPU

_GEMV_KINDS = ("uniform", "read-only-storage", "storage", "read-only-storage", "read-only-storage",
               "read-only-storage", "read-only-storage", "read-only-storage")


def _words(a: np.ndarray) -> np.ndarray:
    """Any array as little-endian u32 words, zero-padded (the GPU reads u8/u16/f16 as u32)."""
    b = np.ascontiguousarray(a).view(np.uint8).ravel()
    pad = (-b.size) % 4
    if pad:
        b = np.concatenate([b, np.zeros(pad, np.uint8)])
    return b.view("<u4")


@dataclass
class _Launch:
    """How one product runs: its pipeline, batch rows per z slice (NB), slices, row groups per
    workgroup, and the x it reads (chunk-transposed float rows; int8 codes and scales too)."""

    pipeline: Any
    nb: int
    slices: int
    gpw: int
    xperm: bool
    int8: bool


@dataclass
class _Chunk:
    row0: int
    rows: int
    groups: int
    buffers: list
    params: Any
    bind_group: Any = None


def _tune() -> dict:
    """PREDPREY_GPU_TUNE="wg=128,gpw=2": overrides of the launch heuristics (for benchmarks).
    Keys: wg, gpw, direct, fast (0: the general predprey_gemv.wgsl instead of predprey_gemv1),
    xperm (0: plain x rows for the fast kernel instead of chunk-transposed ones)."""
    out = {}
    for part in os.environ.get("PREDPREY_GPU_TUNE", "").replace(";", ",").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip().lower()] = int(v)
    return out


class GpuMatrix:
    """A PackedMatrix uploaded to the GPU once (see ``upload``). ``matvec`` / ``matmul`` take
    float32 host arrays and return host arrays; buffers for X, Y and the read-back are reused."""

    def __init__(self, ctx: _Ctx, p: PackedMatrix, max_binding: int | None = None,
                 max_wg_per_dim: int | None = None):
        self._ctx = ctx
        self.shape: tuple[int, int] = tuple(p.shape)
        self.block_size: int = int(p.block_size)
        self.nbytes: int = int(p.nbytes)  # packed bytes (all ten arrays), what a GEMV must read
        n, k = self.shape
        b = self.block_size
        self._nb = -(-k // b)
        self._kp = self._nb * b
        # int8 x per batch row, in vec4<u32>: Kp codes, then Kp / 32 float32 scales padded to a vec4
        self._xq_stride4 = self._kp // 16 + -(-self._kp // 128)
        self._groups = -(-n // _R)
        self._max_binding = int(max_binding or ctx.max_binding)
        self._grid_x = int(max_wg_per_dim or ctx.max_wg_per_dim)
        self._cap = 0
        self._x = self._y = self._xq = self._staging = None
        self._xhost = None
        self._chunks: list[_Chunk] = []
        self._upload(p.arrays())

    # ---- upload

    def _plan(self, a: dict) -> list[tuple[int, int]]:
        """Split the row groups into chunks whose every buffer fits one binding."""
        g_all = self._groups
        kp, nb, b = self._kp, self._nb, self.block_size
        p2 = a["p2_ptr"].astype(np.int64)
        op = a["out_ptr"].astype(np.int64)
        n = self.shape[0]
        col_w = 2 if a["out_cols"].dtype == np.uint16 else 4
        lim = self._max_binding

        def fits(g0: int, g1: int) -> bool:
            r0, r1 = g0 * _R, min(g1 * _R, n)
            e = int(p2[g1] - p2[g0])
            m = int(op[r1] - op[r0])
            meta = 4 * (g1 - g0 + 1) + 2 * e + 5 * e + 4 * (r1 - r0 + 1) + col_w * m + 2 * m + 2 * (r1 - r0) + 64
            return max((g1 - g0) * kp, (r1 - r0) * nb, e * b, meta) + 16 <= lim

        out, g0 = [], 0
        while g0 < g_all:
            if not fits(g0, g0 + 1):
                raise ShapeError(
                    f"one row group of this {self.shape[0]}x{self.shape[1]} matrix needs more than the "
                    f"adapter's max storage binding ({lim} bytes)"
                )
            lo, hi = g0 + 1, g_all
            while lo < hi:  # largest g1 that fits
                mid = (lo + hi + 1) // 2
                if fits(g0, mid):
                    lo = mid
                else:
                    hi = mid - 1
            out.append((g0, lo))
            g0 = lo
        return out

    def _upload(self, a: dict) -> None:
        wgpu = _wgpu()
        ctx = self._ctx
        st = wgpu.BufferUsage.STORAGE
        n, k = self.shape
        kp, nb = self._kp, self._nb
        cols_u16 = a["out_cols"].dtype == np.uint16
        codes = a["codes"]
        for g0, g1 in self._plan(a):
            r0, r1 = g0 * _R, min(g1 * _R, n)
            e0, e1 = int(a["p2_ptr"][g0]), int(a["p2_ptr"][g1])
            m0, m1 = int(a["out_ptr"][r0]), int(a["out_ptr"][r1])
            sections = [
                (a["p2_ptr"][g0:g1 + 1] - np.uint32(e0)).astype("<u4"),
                _words(a["p2_block"][e0:e1]),
                _words(a["p2_scales"][e0:e1]),
                (a["out_ptr"][r0:r1 + 1] - np.uint32(m0)).astype("<u4"),
                _words(a["out_cols"][m0:m1]),
                _words(a["out_vals"][m0:m1]),
                _words(a["row_scales"][r0:r1]),
            ]
            offs = np.cumsum([0] + [s.size for s in sections])
            meta = np.concatenate(sections)
            params = np.zeros(20, dtype="<u4")
            params[:15] = [
                r1 - r0, g1 - g0, r0, n, kp // 16, kp // 4, nb, self.block_size.bit_length() - 1,
                self._grid_x, 1 if cols_u16 else 0, offs[1], offs[2], offs[3], offs[4], offs[5],
            ]
            params[15:17] = np.array([_MAGIC, _MAGIC], dtype="<f4").view("<u4")
            params[17] = offs[6]
            params[18] = self._xq_stride4
            bufs = [
                ctx.buffer(codes[g0:g1], st),
                ctx.buffer(a["scales"][r0:r1], st),
                ctx.buffer(a["p2_codes"][e0:e1], st),
                ctx.buffer(meta, st),
            ]
            pbuf = ctx.buffer(params, wgpu.BufferUsage.UNIFORM)
            self._chunks.append(_Chunk(r0, r1 - r0, g1 - g0, bufs, pbuf))

    # ---- launch

    def _ensure_capacity(self, rows: int) -> None:
        """X, Y and staging buffers for `rows` batch rows (a multiple of the slice size)."""
        if rows <= self._cap:
            return
        wgpu = _wgpu()
        n = self.shape[0]
        cap = max(rows, 8)
        x_bytes, y_bytes = cap * self._kp * 4, cap * n * 4
        if max(x_bytes, y_bytes) > self._ctx.max_binding:
            raise ShapeError(f"a batch of {cap} rows does not fit one GPU binding ({self._ctx.max_binding} bytes)")
        dev = self._ctx.device
        self._x = dev.create_buffer(size=x_bytes, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST)
        self._y = dev.create_buffer(size=y_bytes, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
        self._staging = dev.create_buffer(size=y_bytes, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        self._xq = dev.create_buffer(size=cap * self._xq_stride4 * 16, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST)
        self._xhost = np.zeros((cap, self._kp), dtype=np.float32)
        self._cap = cap
        bgl, _ = self._ctx.layout(_GEMV_KINDS)
        for c in self._chunks:
            res = [c.params, self._x, self._y] + c.buffers + [self._xq]
            c.bind_group = dev.create_bind_group(
                layout=bgl,
                entries=[{"binding": i, "resource": {"buffer": r, "offset": 0, "size": r.size}} for i, r in enumerate(res)],
            )

    def _launch_config(self, batch: int, int8: bool = False) -> tuple[int, int, int, int, int, bool, bool]:
        """(NB, slices, GPW, WG, DIRECT, fast, xperm) for a batch of `batch` rows. ``fast`` (the
        default; PREDPREY_GPU_TUNE fast=0 turns it off): predprey_gemv1.wgsl, entry ``main`` for
        batch 1 and ``main4`` (z slices of NB = 4 batch rows) for larger batches, reading x rows
        chunk-transposed (``xperm``, see the shader's header) unless xperm=0; else
        predprey_gemv.wgsl with NB <= 8 batch rows per slice (plain x rows). ``int8``: the fast
        kernel with INT8 (the general kernel has no int8 variant)."""
        t = _tune()
        kp16 = self._kp // 16
        direct = int(t.get("direct", 2))
        fast = int8 or bool(t.get("fast", 1))
        xperm = fast and bool(t.get("xperm", 1))
        if fast:
            nb = 1 if batch == 1 else 4
            slices, gpw = -(-batch // nb), 1
            # one workgroup per row group: enough threads per group to keep many loads in
            # flight, each still with >= 2 chunks of 16 columns (see the bench sweep)
            # H100 sweeps (docs/device/): K=4096 best at 64, K=14336 at 128 (256 4-7% slower),
            # K=28672 at 256 (128 6% slower)
            wg = 32 if kp16 <= 64 else 64 if kp16 <= 256 else 128 if kp16 <= 1024 else 256
        else:
            nb = min(batch, _MAX_NB)
            slices = -(-batch // nb)
            gpw = 1  # more row groups per workgroup only trade registers for x reuse (see the bench sweep)
            wg = 32 if kp16 <= 64 else 64 if kp16 <= 512 else 128 if kp16 <= 2048 else 256
            gpw = int(t.get("gpw", gpw))
        wg = int(t.get("wg", wg))
        if wg not in (32, 64, 128, 256) or gpw < 1 or 5 * gpw * nb > 40 or direct not in (0, 1, 2):
            raise ValueError(f"PREDPREY_GPU_TUNE gives wg={wg}, gpw={gpw}, direct={direct}; need wg in "
                             "32..256 (a power of 2), gpw*NB <= 8, direct in 0..2")
        return nb, slices, gpw, wg, direct, fast, xperm

    def _pipeline(self, nb: int, gpw: int, wg: int, direct: int, fast: bool = False, xperm: bool = False,
                  int8: bool = False):
        entry = "main"
        if fast:
            const = {"WG": wg, "DIRECT": direct, "XPERM": xperm, "INT8": int8}
            shader = "predprey_gemv1.wgsl"
            entry = "main" if nb == 1 else "main4"
        else:
            const = {"WG": wg, "NB": nb, "GPW": gpw, "DIRECT": direct}
            shader = "predprey_gemv.wgsl"
        if self._ctx.subgroups:
            const["SG_SLOTS"] = max(1, wg // 4)
        return self._ctx.pipeline(shader, _GEMV_KINDS, const, entry=entry)

    def _prepare(self, batch: int, int8: bool = False) -> _Launch:
        """How one product of `batch` rows runs (buffers for it allocated)."""
        nb, slices, gpw, wg, direct, fast, xperm = self._launch_config(batch, int8)
        self._ensure_capacity(slices * nb)
        return _Launch(self._pipeline(nb, gpw, wg, direct, fast, xperm, int8), nb, slices, gpw, xperm, int8)

    def _dispatch(self, cpass, launch: _Launch) -> None:
        """Record the dispatches of one product into an open compute pass."""
        cpass.set_pipeline(launch.pipeline)
        gpw, slices = launch.gpw, launch.slices
        for c in self._chunks:
            n_wg = -(-c.groups // gpw)
            gx = min(n_wg, self._grid_x)
            gy = -(-n_wg // gx)
            cpass.set_bind_group(0, c.bind_group)
            cpass.dispatch_workgroups(gx, gy, slices)

    def _write_x(self, xs: np.ndarray, launch: _Launch) -> None:
        """Rows of X to the GPU, zero-padded to Kp columns; chunk-transposed where the launch
        reads them so (the j-th 4 columns of 16-column chunk c at vec4 c + j * Kp/16); for an
        int8 launch also the int8 codes and scales (``_core.quantize_activations``, the CPU's rule)."""
        b, k = xs.shape
        self._xhost[:b, :k] = xs
        rows = self._xhost[:b]
        if launch.xperm:
            kp16 = self._kp // 16
            rows = np.ascontiguousarray(rows.reshape(b, kp16, 4, 4).transpose(0, 2, 1, 3))
        queue = self._ctx.device.queue
        queue.write_buffer(self._x, 0, rows)
        if launch.int8:
            codes, scales = _core.quantize_activations(xs, self._kp)
            packed = np.zeros((b, self._xq_stride4 * 16), dtype=np.uint8)
            packed[:, :self._kp] = codes.view(np.uint8)
            packed[:, self._kp:self._kp + 4 * scales.shape[1]] = scales.astype("<f4").view(np.uint8)
            queue.write_buffer(self._xq, 0, packed)

    def _run(self, xs: np.ndarray, int8: bool = False) -> np.ndarray:
        n, k = self.shape
        b = xs.shape[0]
        out = np.empty((b, n), dtype=np.float32)
        step = min(_MAX_BATCH_ROWS, max(_MAX_NB, (self._ctx.max_binding // (4 * max(self._kp, n))) // _MAX_NB * _MAX_NB))
        with self._ctx.lock:
            for s0 in range(0, b, step):
                part = xs[s0:s0 + step]
                rows = part.shape[0]
                launch = self._prepare(rows, int8)
                self._write_x(part, launch)
                dev = self._ctx.device
                enc = dev.create_command_encoder()
                cpass = enc.begin_compute_pass()
                self._dispatch(cpass, launch)
                cpass.end()
                size = rows * n * 4
                enc.copy_buffer_to_buffer(self._y, 0, self._staging, 0, size)
                dev.queue.submit([enc.finish()])
                data = self._ctx.map_read(self._staging, size)
                out[s0:s0 + rows] = np.frombuffer(data, dtype=np.float32).reshape(rows, n)
        return out

    def matvec(self, x: np.ndarray, activations: str = "float32") -> np.ndarray:
        """y = W x for float32 x of shape (K,); ``activations="int8"`` as on the CPU (x quantized
        per 32 columns, predators exact)."""
        int8 = _activations_flag(activations)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 or x.shape[0] != self.shape[1]:
            raise ShapeError(f"x has shape {x.shape}; expected ({self.shape[1]},) (the matrix is {self.shape[0]}x{self.shape[1]})")
        return self._run(x[None, :], int8)[0]

    def matmul(self, xs: np.ndarray, activations: str = "float32") -> np.ndarray:
        """Y = X W^T for float32 X of shape (B, K) (the nn.Linear convention)."""
        int8 = _activations_flag(activations)
        xs = np.ascontiguousarray(xs, dtype=np.float32)
        if xs.ndim != 2 or xs.shape[1] != self.shape[1]:
            raise ShapeError(f"X has shape {xs.shape}; expected (B, K = {self.shape[1]})")
        if xs.shape[0] == 0:
            return np.zeros((0, self.shape[0]), dtype=np.float32)
        return self._run(xs, int8)

    @property
    def chunks(self) -> int:
        """Number of row chunks (more than 1 when an array exceeds the adapter's binding size)."""
        return len(self._chunks)

    def __repr__(self) -> str:
        return (f"GpuMatrix(shape={self.shape}, block_size={self.block_size}, nbytes={self.nbytes}, "
                f"chunks={len(self._chunks)}, device={self._ctx.info['device']!r} via {self._ctx.info['backend']})")


def upload(p: PackedMatrix, *, _ctx: _Ctx | None = None, _max_binding: int | None = None,
           _max_wg_per_dim: int | None = None) -> GpuMatrix:
    """Upload a PackedMatrix to the GPU once; use the result with ``pp.matvec`` / ``pp.matmul``.
    Raises GpuUnavailableError (saying what was tried) when no adapter is usable."""
    if not isinstance(p, PackedMatrix):
        raise TypeError(f"upload takes a PackedMatrix, got {type(p).__name__}")
    ctx = _ctx or _context()
    with ctx.lock:
        return GpuMatrix(ctx, p, _max_binding, _max_wg_per_dim)

