"""probe8: how much of the mp4 tail after the VAE decode (1.4-2.6 s in the H100 pipeline runs) is the RGB -> YUV
conversion on the encoder thread? 121 noise frames at 1280x704 (what random weights decode to) fed to Mp4Stream in
the decode's chunks (1, then 4 frames) at its pace (4.4 s for 31 chunks), then the time `close` takes: frames given
as RGB (converted by swscale on the encoder thread, as the engine does) against frames given already in YUV."""
import json, sys, time
import av
import numpy as np
from av.video.reformatter import VideoReformatter
from artifex.engine import video

OUT = sys.argv[1]
rng = np.random.default_rng(0)
frames = rng.integers(0, 256, size=(121, 704, 1280, 3), dtype=np.uint8)
yuv = np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p", dst_colorspace="ITU709")
                .to_ndarray() for f in frames])
scaler = VideoReformatter()  # as Mp4Stream converts: one reformatter for the stream
t = time.perf_counter()
for f in frames[:30]:
    scaler.reformat(av.VideoFrame.from_ndarray(f, format="rgb24"), format="yuv420p", dst_colorspace="ITU709")
res = {"convert_ms_per_frame": round((time.perf_counter() - t) / 30 * 1e3, 2)}


def encode_yuv(self, planes):
    if self._container is None:
        self._open(704, 1280)
    for p in planes:
        self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(p, format="yuv420p")))


def run(name, data, pace_s=4.4 / 31):
    out = video.Mp4Stream(f"{OUT}/{name}.mp4", 24, background=True)
    start = time.perf_counter()
    chunks = [data[:1]] + [data[i:i + 4] for i in range(1, 121, 4)]
    for i, c in enumerate(chunks):
        time.sleep(max(0.0, start + (i + 1) * pace_s - time.perf_counter()))
        out.add(c) if name.startswith("rgb") else out._queue.put(c)
    decoded = time.perf_counter()
    out.close()
    res[f"{name}_tail_s"] = round(time.perf_counter() - decoded, 3)
    res[f"{name}_feed_s"] = round(decoded - start, 3)
    print(name, res, flush=True)


real = video.Mp4Stream._encode
for rep in range(2):
    video.Mp4Stream._encode = real
    run(f"rgb_{rep}", frames)
    video.Mp4Stream._encode = encode_yuv
    run(f"yuv_{rep}", yuv)
json.dump(res, open(f"{OUT}/probe8.json", "w"), indent=1)
