"""Publishing: the model card of an lrc checkpoint (card.py, card_body.py), the exact folder a Hub repo gets
(folder.py; its layout and loading are models.lrc_folder's), and the upload (push.py)."""
