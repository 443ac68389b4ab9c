"""Small shared plumbing for fkd.py, bake.py, meal_v2.py and frskd.py.

crops   - RandomResizedCrop boxes that depend only on (seed, image, crop), and exact replay
labels  - FKD label codecs (Sec. 3.5, Eq. 3-7) and the mmap label store
models  - timm students/teachers, local weight files, per-teacher data configs
data    - ImageFolder loading with clear errors, eval transforms, sharded evaluation
dist    - one file runs under python and torchrun (gloo on CPU, NCCL on CUDA)
ckpt    - atomic checkpoints, resume, the per-epoch metrics log
demo    - the embedded demo data set and its cached demo teachers
"""
