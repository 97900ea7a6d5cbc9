/*
 * centernet_demo: the library end to end around a network you run yourself.
 *
 *   centernet_demo preprocess IMAGE.ppm OUT.bin
 *       binary PPM (P6, 8-bit RGB) -> the network input, raw little-endian float32 NCHW [1, 3, H, W];
 *       prints {"input_shape": [1, 3, H, W]}
 *   centernet_demo decode IMAGE_WIDTH IMAGE_HEIGHT HEATMAP.bin WH.bin REG.bin
 *       raw little-endian float32 NCHW heads of the network-only model (heatmap after sigmoid
 *       [1, C, h, w], wh and reg [1, 2, h, w]) -> one line per detection, best first:
 *       x1 y1 x2 y2 score class_index   (original-image pixels, 0-based class)
 *
 * Exit status 0 on success, 2 with one line on stderr for bad input.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "centernet_edge.h"
#include "centernet_model_config.h"

static int fail(const char *message, const char *detail)
{
    fprintf(stderr, "centernet_demo: %s%s%s\n", message, detail ? ": " : "", detail ? detail : "");
    return 2;
}

static int usage(void)
{
    return fail("usage: centernet_demo preprocess IMAGE.ppm OUT.bin | "
                "centernet_demo decode IMAGE_WIDTH IMAGE_HEIGHT HEATMAP.bin WH.bin REG.bin", NULL);
}

/* Next header token of a PPM: skips whitespace and '#' comments; returns -1 when absent. */
static long ppm_number(FILE *f)
{
    int ch;
    long value = 0;
    int digits = 0;
    for (;;) {
        ch = fgetc(f);
        if (ch == '#') {
            while (ch != '\n' && ch != EOF) ch = fgetc(f);
        } else if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r') {
            break;
        }
    }
    while (ch >= '0' && ch <= '9') {
        if (value > 100000000L) return -1;
        value = value * 10 + (ch - '0');
        digits++;
        ch = fgetc(f);
    }
    if (!digits) return -1;
    /* exactly one whitespace byte ends the token (the last one before the raster) */
    if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r') return -1;
    return value;
}

static int write_f32_le(FILE *f, const float *values, size_t count)
{
    size_t i;
    for (i = 0; i < count; ++i) {
        unsigned char b[4];
        uint32_t bits;
        memcpy(&bits, &values[i], 4);
        b[0] = (unsigned char)(bits & 0xffu);
        b[1] = (unsigned char)((bits >> 8) & 0xffu);
        b[2] = (unsigned char)((bits >> 16) & 0xffu);
        b[3] = (unsigned char)((bits >> 24) & 0xffu);
        if (fwrite(b, 1, 4, f) != 4) return -1;
    }
    return 0;
}

static int run_preprocess(const char *image_path, const char *out_path)
{
    static const cn_config config = CN_MODEL_CONFIG_INIT;
    cn_context *ctx = NULL;
    cn_image image;
    cn_transform t;
    unsigned char *pixels = NULL;
    float *input = NULL;
    size_t bytes = 0, count;
    long width, height, maxval;
    char magic[3] = {0, 0, 0};
    FILE *f;
    cn_status st;
    int rc = 0;

    f = fopen(image_path, "rb");
    if (!f) return fail("cannot open the image", image_path);
    if (fread(magic, 1, 2, f) != 2 || magic[0] != 'P' || magic[1] != '6') {
        fclose(f);
        return fail("not a binary PPM (P6)", image_path);
    }
    width = ppm_number(f);
    height = ppm_number(f);
    maxval = ppm_number(f);
    if (width <= 0 || height <= 0 || width > CN_MAX_IMAGE_SIDE || height > CN_MAX_IMAGE_SIDE) {
        fclose(f);
        return fail("PPM header has an invalid size", image_path);
    }
    if (maxval != 255) {
        fclose(f);
        return fail("only 8-bit PPM (maxval 255) is supported", image_path);
    }
    count = (size_t)width * (size_t)height * 3u;
    pixels = (unsigned char *)malloc(count);
    if (!pixels) {
        fclose(f);
        return fail("out of memory", NULL);
    }
    if (fread(pixels, 1, count, f) != count) {
        free(pixels);
        fclose(f);
        return fail("PPM raster is truncated", image_path);
    }
    fclose(f);

    st = cn_create(&config, &ctx);
    if (st != CN_OK) {
        free(pixels);
        return fail("cannot create the context", cn_status_string(st));
    }
    image.data = pixels;
    image.width = (int)width;
    image.height = (int)height;
    image.stride_bytes = (size_t)width * 3u;
    image.format = CN_PIXEL_RGB; /* PPM stores RGB; the library converts to the network's order */
    st = cn_input_bytes(ctx, image.width, image.height, CN_TENSOR_FLOAT32_NCHW, &bytes);
    if (st == CN_OK) {
        input = (float *)malloc(bytes);
        if (!input) st = CN_ERR_BUFFER_TOO_SMALL;
    }
    if (st == CN_OK) st = cn_preprocess(ctx, &image, CN_TENSOR_FLOAT32_NCHW, 0.0f, 0, input, bytes, &t);
    if (st != CN_OK) {
        rc = fail("pre-processing failed", cn_status_string(st));
    } else {
        f = fopen(out_path, "wb");
        if (!f) {
            rc = fail("cannot write the output", out_path);
        } else {
            int bad = write_f32_le(f, input, bytes / sizeof(float)) != 0;
            if (fclose(f) != 0) bad = 1;
            if (bad) rc = fail("cannot write the output", out_path);
            else printf("{\"input_shape\": [1, 3, %d, %d]}\n", t.input_height, t.input_width);
        }
    }
    free(input);
    free(pixels);
    cn_destroy(ctx);
    return rc;
}

static int parse_int(const char *text, int *value)
{
    char *end = NULL;
    long v;
    errno = 0;
    v = strtol(text, &end, 10);
    if (errno || !end || *end || end == text || v <= 0 || v > CN_MAX_IMAGE_SIDE) return -1;
    *value = (int)v;
    return 0;
}

/* Reads exactly `count` little-endian float32 values; returns a message on error. */
static const char *read_f32_le(const char *path, float *values, size_t count)
{
    FILE *f = fopen(path, "rb");
    size_t i;
    unsigned char b[4];
    if (!f) return "cannot open";
    for (i = 0; i < count; ++i) {
        uint32_t bits;
        if (fread(b, 1, 4, f) != 4) {
            fclose(f);
            return "holds fewer values than the heads' shape needs";
        }
        bits = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
        memcpy(&values[i], &bits, 4);
    }
    if (fgetc(f) != EOF) {
        fclose(f);
        return "holds more values than the heads' shape needs";
    }
    fclose(f);
    return NULL;
}

static int run_decode(char **argv)
{
    static const cn_config config = CN_MODEL_CONFIG_INIT;
    cn_context *ctx = NULL;
    cn_transform t;
    cn_heads heads;
    cn_detection *dets = NULL;
    float *hm = NULL, *wh = NULL, *reg = NULL;
    int width, height, count = 0, i, rc = 0;
    size_t cells;
    const char *problem = NULL, *which = NULL;
    cn_status st;

    if (parse_int(argv[2], &width) || parse_int(argv[3], &height))
        return fail("IMAGE_WIDTH and IMAGE_HEIGHT must be positive integers", NULL);
    st = cn_create(&config, &ctx);
    if (st != CN_OK) return fail("cannot create the context", cn_status_string(st));
    st = cn_transform_for_image(ctx, width, height, &t);
    if (st != CN_OK) {
        cn_destroy(ctx);
        return fail("invalid image size", cn_status_string(st));
    }
    cells = (size_t)t.output_width * (size_t)t.output_height;
    hm = (float *)malloc(cells * (size_t)config.num_classes * sizeof(float));
    wh = (float *)malloc(cells * 2u * sizeof(float));
    reg = (float *)malloc(cells * 2u * sizeof(float));
    dets = (cn_detection *)malloc((size_t)config.k * sizeof(cn_detection));
    if (!hm || !wh || !reg || !dets) {
        rc = fail("out of memory", NULL);
        goto done;
    }
    if ((problem = read_f32_le(argv[4], hm, cells * (size_t)config.num_classes)) != NULL) which = argv[4];
    else if ((problem = read_f32_le(argv[5], wh, cells * 2u)) != NULL) which = argv[5];
    else if (config.reg_offset && (problem = read_f32_le(argv[6], reg, cells * 2u)) != NULL) which = argv[6];
    if (problem) {
        fprintf(stderr, "centernet_demo: %s %s (expected float32 [1, %d, %d, %d] for the heatmap, "
                "[1, 2, %d, %d] for wh and reg)\n", which, problem, config.num_classes, t.output_height,
                t.output_width, t.output_height, t.output_width);
        rc = 2;
        goto done;
    }
    memset(&heads, 0, sizeof heads);
    heads.heatmap.data = hm;
    heads.wh.data = wh;
    heads.reg.data = config.reg_offset ? reg : NULL;
    heads.heatmap.dtype = heads.wh.dtype = heads.reg.dtype = CN_DTYPE_FLOAT32;
    heads.heatmap.layout = heads.wh.layout = heads.reg.layout = CN_LAYOUT_NCHW;
    heads.batch = 1;
    heads.height = t.output_height;
    heads.width = t.output_width;
    st = cn_postprocess(ctx, &heads, &t, -INFINITY, dets, config.k, &count);
    if (st != CN_OK) {
        rc = fail("post-processing failed", cn_status_string(st));
        goto done;
    }
    for (i = 0; i < count; ++i)
        printf("%.9g %.9g %.9g %.9g %.9g %d\n", dets[i].x1, dets[i].y1, dets[i].x2, dets[i].y2, dets[i].score,
               dets[i].class_id);
done:
    free(hm);
    free(wh);
    free(reg);
    free(dets);
    cn_destroy(ctx);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) return usage();
    if (strcmp(argv[1], "preprocess") == 0) {
        if (argc != 4) return usage();
        return run_preprocess(argv[2], argv[3]);
    }
    if (strcmp(argv[1], "decode") == 0) {
        if (argc != 7) return usage();
        return run_decode(argv);
    }
    return usage();
}
