"""`lrc demo`: the whole flow on a default that ships with lrc, offline, in a temporary folder.

A small timm ViT (the teacher, assets/teacher/) trained on 8x8 handwritten digits (assets/digits.npz) is factorized,
reported, recovered by distillation and evaluated through the same functions the commands run; `demo()` returns
the before / after figures. digits.py holds the data and its fixed split, teacher.py how the teacher was made.
"""
