"""probe9: x264's threading in the mp4 writer. PyAV opens libx264 with slice threads (one frame split across
threads); frame threads (x264's default outside PyAV) encode several frames at once. The same feed as probe8 (121
noise frames at 1280x704 in the decode's chunks at its pace), each mode twice: the tail after the last frame, the
whole encode's frame rate when fed at once, and the file size."""
import json, os, sys, time
import numpy as np
from artifex.engine import video

OUT = sys.argv[1]
rng = np.random.default_rng(0)
frames = rng.integers(0, 256, size=(121, 704, 1280, 3), dtype=np.uint8)
real_open = video.Mp4Stream._open
res = {"cpus": os.cpu_count()}


def with_threads(kind):
    def _open(self, height, width):
        real_open(self, height, width)
        self._stream.codec_context.thread_type = kind
    return _open


def run(name, kind, pace_s):
    video.Mp4Stream._open = with_threads(kind)
    path = f"{OUT}/{name}.mp4"
    out = video.Mp4Stream(path, 24, background=True)
    start = time.perf_counter()
    chunks = [frames[:1]] + [frames[i:i + 4] for i in range(1, 121, 4)]
    for i, c in enumerate(chunks):
        time.sleep(max(0.0, start + (i + 1) * pace_s - time.perf_counter()))
        out.add(c)
    fed = time.perf_counter()
    out.close()
    end = time.perf_counter()
    res[name] = {"thread_type": kind, "paced": pace_s > 0, "tail_s": round(end - fed, 3),
                 "total_s": round(end - start, 3), "fps": round(121 / (end - start), 1),
                 "mb": round(os.path.getsize(path) / 1e6, 2)}
    print(name, res[name], flush=True)


for rep in range(2):
    for kind in ("SLICE", "FRAME"):
        run(f"{kind.lower()}_paced_{rep}", kind, 4.4 / 31)
        run(f"{kind.lower()}_at_once_{rep}", kind, 0.0)
json.dump(res, open(f"{OUT}/probe9.json", "w"), indent=1)
