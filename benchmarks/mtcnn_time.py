import time, numpy as np, torch, sys
sys.path.insert(0, ".")
from engine.bench import stream_frames
from facenet_pytorch import MTCNN
frames = np.stack(stream_frames(64))
for mfs in (20, 40):
    m = MTCNN(image_size=48, margin=2, post_process=False, select_largest=True, keep_all=False, device="cuda", min_face_size=mfs)
    for bs in (8, 64):
        x = frames[:bs]
        m.detect(x); torch.cuda.synchronize()
        t = time.perf_counter(); n = 5
        for _ in range(n): boxes, _ = m.detect(x)
        torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
        print(f"mtcnn cuda min_face {mfs} batch {bs}: {dt*1000:.1f} ms, {bs/dt:.0f} frames/s, found {sum(b is not None for b in boxes)}")
