/* Randomised robustness loop, built with -fsanitize=address,undefined: random image sizes up to 4000x3000,
 * odd strides, every pixel format and tensor type, NaN/Inf heads, K beyond the candidates, all-equal maps,
 * invalid arguments. Asserts the documented status of every call; the sanitizers catch memory errors.
 * Usage: fuzz_centernet_edge [ITERATIONS [SEED]]. Prints "N passed, M failed". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "centernet_edge.h"

static unsigned long long rng_state;
static unsigned rnd(void)
{
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (unsigned)(rng_state >> 33);
}
static int between(int lo, int hi) { return lo + (int)(rnd() % (unsigned)(hi - lo + 1)); }

static int passed, failed;
#define EXPECT(cond, what)                                                           \
    do {                                                                             \
        if (cond) passed++;                                                          \
        else {                                                                       \
            failed++;                                                                \
            printf("FAIL iteration %d: %s (%s)\n", iteration, what, #cond);          \
        }                                                                            \
    } while (0)

static int bytes_per_pixel(int format) { return format == CN_PIXEL_GRAY ? 1 : format == CN_PIXEL_BGRA ? 4 : 3; }

int main(int argc, char **argv)
{
    int iterations = argc > 1 ? atoi(argv[1]) : 60;
    int iteration;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 12345ULL;
    for (iteration = 0; iteration < iterations; ++iteration) {
        cn_config c;
        cn_context *ctx = NULL;
        cn_image img;
        cn_transform t;
        cn_heads h;
        cn_status st;
        int big = iteration % 10 == 0;
        int width = big ? between(2000, 4000) : between(1, 300);
        int height = big ? between(1500, 3000) : between(1, 300);
        int format = between(0, 3), type = between(0, 3), bpp = bytes_per_pixel(format);
        size_t stride = (size_t)width * (size_t)bpp + (size_t)between(0, 7);
        uint8_t *pixels;
        void *out;
        size_t need = 0;
        int counts[2], b, cells, i, mode = between(0, 4);
        float *heat, *wh, *reg;
        cn_detection *dets;

        cn_config_default(&c);
        c.resize = between(0, 1);
        c.input_width = 32 * between(1, 12);
        c.input_height = 32 * between(1, 12);
        c.num_classes = between(1, 5);
        c.k = between(1, 300);
        c.topk = between(0, 1);
        c.color = between(0, 1);
        c.heatmap_activation = between(0, 1);
        c.reg_offset = between(0, 1);
        st = cn_create(&c, &ctx);
        EXPECT(st == CN_OK, "create");
        if (st != CN_OK) continue;

        pixels = (uint8_t *)malloc(stride * (size_t)height);
        for (i = 0; i < (int)(stride * (size_t)height) && i < 1 << 16; ++i) pixels[i] = (uint8_t)rnd();
        if (stride * (size_t)height > (1u << 16)) memset(pixels + (1 << 16), 99, stride * (size_t)height - (1 << 16));
        img.data = pixels;
        img.width = width;
        img.height = height;
        img.stride_bytes = stride;
        img.format = format;
        st = cn_input_bytes(ctx, width, height, type, &need);
        EXPECT(st == CN_OK, "input bytes");
        out = malloc(need);
        st = cn_preprocess(ctx, &img, type, 0.05f, type == CN_TENSOR_UINT8_NCHW ? 128 : 0, out, need, &t);
        EXPECT(st == CN_OK, "preprocess");
        EXPECT(cn_preprocess(ctx, &img, type, 0.05f, 0, out, need - 1, &t) == CN_ERR_BUFFER_TOO_SMALL, "short out");
        img.stride_bytes = (size_t)width * (size_t)bpp - 1;
        EXPECT(cn_preprocess(ctx, &img, type, 0.05f, 0, out, need, &t) == CN_ERR_INVALID_ARGUMENT, "short stride");
        img.stride_bytes = stride;
        img.width = -width;
        EXPECT(cn_preprocess(ctx, &img, type, 0.05f, 0, out, need, &t) == CN_ERR_INVALID_ARGUMENT, "neg width");
        EXPECT(cn_preprocess(ctx, NULL, type, 0.05f, 0, out, need, &t) == CN_ERR_NULL_ARGUMENT, "null image");
        free(out);
        free(pixels);

        /* heads for a batch of 2 at this transform's size */
        cn_transform_for_image(ctx, width, height, &t);
        cells = t.output_width * t.output_height;
        heat = (float *)malloc(sizeof(float) * (size_t)(2 * c.num_classes * cells));
        wh = (float *)malloc(sizeof(float) * (size_t)(2 * 2 * cells));
        reg = (float *)malloc(sizeof(float) * (size_t)(2 * 2 * cells));
        for (i = 0; i < 2 * c.num_classes * cells; ++i) {
            float v = (float)(rnd() % 1000) / 1000.0f;
            if (mode == 1) v = 0.5f;                              /* all equal */
            else if (mode == 2 && rnd() % 7 == 0) v = NAN;         /* NaN scattered */
            else if (mode == 3 && rnd() % 5 == 0) v = (rnd() & 1) ? INFINITY : -INFINITY;
            heat[i] = v;
        }
        for (i = 0; i < 4 * cells; ++i) {
            wh[i] = mode == 4 && i % 3 == 0 ? NAN : (float)(rnd() % 50);
            reg[i] = mode == 4 && i % 5 == 0 ? INFINITY : 0.5f;
        }
        memset(&h, 0, sizeof h);
        h.heatmap.data = heat;
        h.wh.data = wh;
        h.reg.data = reg;
        h.heatmap.layout = h.wh.layout = h.reg.layout = between(0, 1);
        h.batch = 2;
        h.height = t.output_height;
        h.width = t.output_width;
        dets = (cn_detection *)malloc(sizeof(cn_detection) * (size_t)(2 * c.k));
        {
            cn_transform two[2];
            two[0] = t;
            two[1] = t;
            st = cn_postprocess(ctx, &h, two, -INFINITY, dets, c.k, counts);
            EXPECT(st == CN_OK, "postprocess");
            for (b = 0; b < 2 && st == CN_OK; ++b) {
                int expect = c.k < c.num_classes * cells ? c.k : c.num_classes * cells;
                EXPECT(counts[b] == expect, "K rows, or every candidate when K exceeds them");
                for (i = 1; i < counts[b]; ++i) {
                    const cn_detection *p = &dets[b * c.k + i - 1], *q = &dets[b * c.k + i];
                    EXPECT(p->score >= q->score || isnan(p->score) || isnan(q->score), "best first");
                    EXPECT(q->class_id >= 0 && q->class_id < c.num_classes, "class range");
                }
            }
            two[1].output_width += 1;
            EXPECT(cn_postprocess(ctx, &h, two, -INFINITY, dets, c.k, counts) == CN_ERR_SHAPE_MISMATCH, "shape");
            EXPECT(cn_postprocess(ctx, &h, two, NAN, dets, c.k, counts) == CN_ERR_INVALID_ARGUMENT, "nan thr");
            h.batch = 0;
            EXPECT(cn_postprocess(ctx, &h, two, 0.0f, dets, c.k, counts) == CN_ERR_INVALID_ARGUMENT, "batch 0");
        }
        free(dets);
        free(heat);
        free(wh);
        free(reg);
        cn_destroy(ctx);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
