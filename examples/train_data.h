/*
 * train_data.h - Fashion-MNIST loader: gzip'ed IDX files read with zlib.
 *
 * Files (Debian package dataset-fashion-mnist, default directory
 * /usr/share/datasets/fashion-mnist):
 *   {train,t10k}-images-idx3-ubyte.gz  magic 0x00000803, [N][28][28] uint8
 *   {train,t10k}-labels-idx1-ubyte.gz  magic 0x00000801, [N] uint8 in 0..9
 * Every header field, the payload length and the label range are checked.
 * What it does not do: normalize or shuffle (train_main.c does that per batch).
 */
#ifndef TRAIN_DATA_H
#define TRAIN_DATA_H

#include <stdint.h>

#define TRAIN_DATA_DEFAULT_DIR "/usr/share/datasets/fashion-mnist"
#define TRAIN_DATA_PACKAGE "dataset-fashion-mnist"
#define TRAIN_IMG_H 28
#define TRAIN_IMG_W 28
#define TRAIN_IMG_PIXELS (TRAIN_IMG_H * TRAIN_IMG_W)
#define TRAIN_CLASSES 10

typedef struct {
    int64_t n;        /* number of images */
    uint8_t *images;  /* [n][28*28] raw pixels, owned */
    uint8_t *labels;  /* [n] in 0..9, owned */
} train_dataset;

/* Loads split "train" or "t10k" from dir. Returns 0 on success; otherwise -1 with a
 * one-line human-readable reason in err (which names the file and the package). */
int train_dataset_load(train_dataset *ds, const char *dir, const char *split, char *err, int errlen);
void train_dataset_free(train_dataset *ds);

/* Pixel normalization shared with scripts/bench/train_torch.py: (p/255 - mean)/std. */
#define TRAIN_PIXEL_MEAN 0.2860f
#define TRAIN_PIXEL_STD 0.3530f

#endif /* TRAIN_DATA_H */
