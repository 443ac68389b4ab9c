"""Small shared plumbing for fkd.py, bake.py, meal_v2.py and frskd.py.

crops   - RandomResizedCrop boxes that depend only on (seed, image, crop), and exact replay
labels  - FKD label codecs (Sec. 3.5, Eq. 3-7) and the mmap label store
released - import of the authors' released FKD / Fast MEAL V2 label files (safe loading)
models  - timm students/teachers, local weight files, per-teacher data configs
data    - ImageFolder loading with clear errors, eval transforms, sharded evaluation
seg     - segmentation data (VOCdevkit, images/ + masks/), paired transforms, mean IoU
dist    - one file runs under python and torchrun (gloo on CPU, NCCL on CUDA)
flags   - argparse types that validate every numeric flag at parse time
ckpt    - atomic checkpoints, the output-folder lock, resume policy, the per-epoch metrics log
demo    - the embedded demo data sets (classification, segmentation) and the cached demo teachers
"""
