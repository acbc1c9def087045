"""Reading shards: the training stream, the validation stream, and the augmentation on the device.

    stream = TrainStream(cfg, rank, world_size)        # infinite; state_dict()/load_state_dict() resume it
    augment = DeviceAugment(cfg.data, model.output_range).to(device)
    for batch in stream:                                # Batch(images uint8 [B,3,H,W] on CPU, labels, keys)
        x = augment(batch.images.to(device, non_blocking=True), train=True)
    for batch in val_batches(cfg, rank, world_size):   # finite; every val sample once over ranks x workers
        ...                                             # no collectives inside this loop (counts differ per rank)

Both streams are explicit WebDataset pipelines (`wds.DataPipeline`, one commented stage per step,
like open_clip's `get_wds_dataset`), run inside torch DataLoader workers (`batch_size=None`: the
workers batch on the CPU themselves). Two stages are our own for speed, measured by
`make bench-data`: tar members are read by a lean header parser (Python's tarfile, which
webdataset uses, costs a third of a 128-px JPEG decode per sample), and batches travel from the
workers through reused shared-memory slots rather than a new shared-memory file per batch.

Exact resume. The training stream of one rank is a pure function of (files, seed, rank, world size,
workers, batch size, shuffle buffer). Each *logical worker* w (one per DataLoader worker; one when
num_workers=0) produces an endless sequence of "worker epochs". In worker epoch e it draws whole
shards with replacement from an RNG seeded by (seed, rank, w, e) until it holds at least
ceil(train count / (world size x workers)) samples, reads them, shuffles them with a buffer whose RNG
is seeded the same way and which is drained at the end of the epoch, then decodes and batches. Every
batch carries its logical worker and a cursor: (epoch, samples of that epoch consumed, corrupt ones
included). The DataLoader hands batch b out from worker b % W, so the stream keeps, per logical
worker, the cursor of the last batch it gave the consumer. To resume after k batches, physical
worker i plays logical worker (i + k) % W (the next batch must come from logical worker k % W), draws
that epoch's shards directly (earlier epochs are never read) and replays the epoch's raw, undecoded
samples through the shuffle buffer up to its cursor: cost at most one worker epoch of tar reading,
no decoding. The state is small plain JSON (see TrainStream.state_dict).

Safety: only whitelisted tar members are ever read (image, cls); images are decoded by
pipeline.images.decode_image, which never unpickles. `.pyd`/`.pickle` members are skipped unread
(webdataset's default decoders would unpickle them). Before reading, every shard is checked against
its manifest entry (size; sha256 with data.verify_shards=sha256) and must lie inside the shards
folder: a damaged shard stops the run with one sentence, or is left out (data.on_damaged_shard=skip)
or read for what it holds (=read). While reading, corrupt samples, and the samples a truncated or
unreadable shard is missing (by its manifest count), are skipped and counted, never a crash; the
warnings name the shard file and byte offset.
"""

# The package's parts, each readable on its own:
#   manifest.py      manifest.json: read and check it
#   tar.py           tar shards: header parser, sequential samples, random access by position
#   decode.py        raw sample -> decoded image and label (whitelisted members only)
#   order.py         seeded RNGs and the per-epoch global permutation
#   transport.py     batching, shared-memory batch slots, the DataLoader that runs the readers
#   train_stream.py  TrainStream (data.order=permutation | resampled) and its resume state
#   validation.py    val_batches: every val sample once over ranks x workers
#   augment.py       DeviceAugment (on the device: normalisation, flip, rotation)
#   gpu_decode.py    data.decode=gpu: workers read JPEG bytes, nvJPEG decodes each batch
# Every name other modules import from `pipeline.data` is re-exported here; the parts import each
# other's public names from their own modules, and private helpers stay private to their module.

from pipeline.data.augment import DeviceAugment
from pipeline.data.decode import MAX_CONSECUTIVE_BAD
from pipeline.data.manifest import (IMAGE_EXTS, batch_layout, check_fits, data_range, read_manifest,
                                    sample_shape, spatial_dims)
from pipeline.data.order import epoch_order, permute
from pipeline.data.tar import READ_EXTS, read_tars
from pipeline.data.train_stream import STATE_FORMAT, TrainStream
from pipeline.data.transport import PREFETCH_BATCHES, Batch, batched
from pipeline.data.validation import val_assignment, val_batches

__all__ = ["Batch", "DeviceAugment", "IMAGE_EXTS", "MAX_CONSECUTIVE_BAD", "PREFETCH_BATCHES",
           "READ_EXTS", "STATE_FORMAT", "TrainStream", "batch_layout", "batched", "check_fits", "data_range",
           "epoch_order", "permute", "read_manifest", "read_tars", "sample_shape", "spatial_dims", "val_assignment",
           "val_batches"]
