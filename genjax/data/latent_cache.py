"""A latent cache: per-example arrays (a frozen VAE's posterior mean and std) computed once and
stored as an array_record file, read back as a grain random-access source.

    WORKDIR/latents/NAME.array_record   one record per example, the fields' raw bytes concatenated
                                        (ragged caches: after the record's field shapes, int64)
    WORKDIR/latents/NAME.json           spec: {"fields": {field: {"shape", "dtype"}}, "num_examples",
                                        "meta": {...what the cache was computed from}, "ragged"?}

Both files are written under temporary names and renamed when complete, the spec last, so a cache
whose spec exists is whole; a killed run leaves at most `*.tmp` files, overwritten on the next try.
`ensure` reuses a cache whose spec's `meta` equals the caller's (same VAE, dataset, split, size)
and recomputes it otherwise. `LatentCacheSource` (over `ArrayRecordDataSource`) goes through the
same `genjax.data.pipeline.make_dataset` as any other source (shard, shuffle, batch, checkpoint).

Caching the posterior (mean, std) rather than one latent sample keeps the diffusion model's input
stochastic: the train step draws `z = mean + std * eps` with its own rng, exactly as encoding on the
fly with `AutoencoderKL.encode_latents(x, rng)` (LDM, Rombach et al. 2022, Sec. 3.1).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from genjax.errors import check
from genjax.io import fs

SPEC_VERSION = 1


def paths(directory: str, name: str) -> tuple[str, str]:
    """`(records path, spec path)` of cache `name` in `directory`."""
    return os.path.join(directory, f"{name}.array_record"), os.path.join(directory, f"{name}.json")


def write(directory: str, name: str, batches: Iterable[Mapping[str, np.ndarray]], *,
          meta: Mapping[str, Any], ragged: bool = False) -> dict[str, Any]:
    """Write the examples of `batches` (dicts of numpy arrays with a leading batch axis, the same
    fields, per-example shapes and dtypes in every batch) as cache `name`; returns the spec.

    ragged=True: examples of different shapes (NaViT: every clip at its own size), the fields'
    ranks and dtypes fixed; each record then starts with its fields' shapes (int64) and the spec's
    field shapes are None where they vary.

    Raises:
      UserError: no examples, or a batch whose fields / shapes / dtypes (ragged: ranks / dtypes)
        differ from the first.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(directory, exist_ok=True)
    records, spec_path = paths(directory, name)
    fields: dict[str, dict[str, Any]] | None = None
    count = 0
    writer = ArrayRecordWriter(records + ".tmp", "group_size:1")
    try:
        for batch in batches:
            arrays = {k: np.asarray(v) for k, v in batch.items()}
            these = {k: {"shape": list(v.shape[1:]), "dtype": v.dtype.str} for k, v in sorted(arrays.items())}
            if ragged and fields is not None:  # ranks and dtypes must agree; varying sides become None
                check({k: (len(f["shape"]), f["dtype"]) for k, f in these.items()}
                      == {k: (len(f["shape"]), f["dtype"]) for k, f in fields.items()}, "latent cache batch",
                      these, f"must have the first batch's fields, ranks and dtypes {fields}")
                these = {k: {"shape": [a if a == b else None for a, b in zip(f["shape"], fields[k]["shape"])],
                             "dtype": f["dtype"]} for k, f in these.items()}
                fields = these
            fields = these if fields is None else fields
            check(these == fields, "latent cache batch", these, f"must match the first batch's fields {fields}")
            for i in range(len(next(iter(arrays.values())))):
                head = np.array([d for k in fields for d in arrays[k].shape[1:]], np.int64).tobytes() if ragged else b""
                writer.write(head + b"".join(np.ascontiguousarray(arrays[k][i]).tobytes() for k in fields))
                count += 1
    finally:
        writer.close()
    check(count > 0 and fields is not None, "latent cache", name, "got no examples to write")
    os.replace(records + ".tmp", records)
    spec = {"version": SPEC_VERSION, "fields": fields, "num_examples": count, "meta": dict(meta),
            **({"ragged": True} if ragged else {})}
    fs.write_json(spec_path, spec, "latent cache spec", indent=2)
    return spec


def read_spec(directory: str, name: str) -> dict[str, Any] | None:
    """The spec of cache `name`, or None if there is no complete cache."""
    _, spec_path = paths(directory, name)
    if not os.path.isfile(spec_path):
        return None
    with open(spec_path) as f:
        return json.load(f)


class LatentCacheSource:
    """grain random-access source over a cache: example i is `{field: np.ndarray}` with the
    spec's shapes and dtypes (read-only views of the record's bytes).

    Raises:
      UserError: `directory` holds no complete cache `name`.
    """

    def __init__(self, directory: str, name: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        spec = read_spec(directory, name)
        check(spec is not None, "latent cache", os.path.join(directory, name),
              "does not exist (no spec file); build it with `latent_cache.ensure`")
        self.spec = spec
        self._fields = [(key, np.dtype(f["dtype"]), tuple(f["shape"])) for key, f in spec["fields"].items()]
        self._ragged = bool(spec.get("ragged", False))
        self._head = sum(len(shape) for _, _, shape in self._fields) if self._ragged else 0
        self._data = ArrayRecordDataSource(paths(directory, name)[0])
        check(len(self._data) == spec["num_examples"], "latent cache", name,
              f"holds {len(self._data)} records but its spec says {spec['num_examples']}")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        record = self._data[i]
        dims = iter(np.frombuffer(record, np.int64, count=self._head).tolist())
        out, offset = {}, self._head * 8
        for key, dtype, shape in self._fields:
            shape = tuple(next(dims) for _ in shape) if self._ragged else shape
            count = int(np.prod(shape, dtype=np.int64))
            out[key] = np.frombuffer(record, dtype, count=count, offset=offset).reshape(shape)
            offset += count * dtype.itemsize
        return out


def ensure(directory: str, name: str, *, meta: Mapping[str, Any],
           compute: Callable[[], Iterable[Mapping[str, np.ndarray]]], ragged: bool = False) -> LatentCacheSource:
    """Open cache `name`, computing and writing it first if it is missing or was computed from a
    different `meta` (JSON-serialisable: what the cache depends on) or raggedness (`write`).

    With several processes, process 0 computes and writes (the directory must be shared) while
    the others wait at a barrier.
    """
    import jax

    meta = json.loads(json.dumps(dict(meta)))  # compare as JSON (tuples -> lists)
    spec = read_spec(directory, name)
    if jax.process_index() == 0 and (spec is None or spec.get("meta") != meta
                                     or spec.get("version") != SPEC_VERSION or spec.get("ragged", False) != ragged):
        write(directory, name, compute(), meta=meta, ragged=ragged)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"latent_cache:{name}")
    return LatentCacheSource(directory, name)
