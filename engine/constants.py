"""Numbers the released WorldStereo checkpoints fix, one home each: every module that needs one imports it here.

Facts of the Wan2.1 image-to-video backbone and of the released configs (``nframe``, the reference limit);
plain numbers, so any room of the engine may import them (``engine/geometry`` included).
"""
KEYFRAMES = 21  # keyframes per clip (the released configs' nframe); frame 0 is the input view
LATENT_CHANNELS = 16  # Wan VAE latent channels
MASK_CHANNELS = 4  # first-frame mask channels of the I2V input: 16 noisy latent + 4 mask + 16 condition latent = 36
VAE_SCALE = 8  # Wan VAE: pixels per latent cell along each side
PATCH_SIZE = 2  # the transformer's spatial patch (1, 2, 2)
SIZE_MULTIPLE = VAE_SCALE * PATCH_SIZE  # frame sides must be multiples of this
TEXT_TOKENS = 512  # UMT5 tokens per prompt; the backbone splits its cross-attention context at this count
IMAGE_TOKENS = 257  # CLIP ViT-H/14 tokens of the input view: (224 / 14)² patches + 1 class token
MAX_REFERENCES = 8  # reference frames per clip the released memory models take
# Rows of the memory checkpoints' ``ref_index_embedding`` table. The release builds it with 21 rows whatever a
# config's nframe says, so this is a weight shape, not the clip length: it stays 21 if KEYFRAMES ever changes.
REF_INDEX_EMBEDDINGS = 21
# Not a checkpoint's number but the tiny packages' own: their frames are the official buckets at this scale (the
# tiny configs' scale_map, and the tiny-random engine's size), so a CPU runs them in seconds.
TINY_FRAME_SCALE = 1 / 6
