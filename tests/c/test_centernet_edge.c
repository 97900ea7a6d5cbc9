/* C unit tests of centernet_edge: a tiny runner, no framework. Prints "N passed, M failed". */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "centernet_edge.h"

static int passed, failed;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (cond) {                                                                     \
            passed++;                                                                   \
        } else {                                                                        \
            failed++;                                                                   \
            printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                      \
        }                                                                               \
    } while (0)

static unsigned char arena[1 << 20];

static cn_context *make(cn_config *c)
{
    cn_context *ctx = NULL;
    /* &arena[16 - (address & 15)] would also do; the array is aligned enough on every ABI we build for */
    unsigned char *mem = arena + ((16u - ((size_t)arena & 15u)) & 15u);
    cn_status st = cn_context_init(mem, sizeof arena - 16, c, &ctx);
    CHECK(st == CN_OK);
    return ctx;
}

static void test_version_and_status(void)
{
    char expect[32];
    int s;
    sprintf(expect, "%d.%d.%d", CN_VERSION_MAJOR, CN_VERSION_MINOR, CN_VERSION_PATCH);
    CHECK(strcmp(cn_version(), expect) == 0);
    CHECK(cn_abi_version() == CN_ABI_VERSION);
    for (s = 0; s <= 6; ++s) CHECK(strcmp(cn_status_string((cn_status)s), "unknown status code") != 0);
    CHECK(strcmp(cn_status_string((cn_status)42), "unknown status code") == 0);
}

static void test_config_checks(void)
{
    cn_config c;
    cn_context *ctx = NULL;
    unsigned char small[64];
    CHECK(cn_config_default(NULL) == CN_ERR_NULL_ARGUMENT);
    CHECK(cn_config_default(&c) == CN_OK);
    CHECK(cn_config_check(&c) == CN_OK);
    c.abi_version = CN_ABI_VERSION + 1;
    CHECK(cn_config_check(&c) == CN_ERR_BAD_CONFIG);
    CHECK(cn_context_size(&c) == 0);
    cn_config_default(&c);
    c.k = 0;
    CHECK(cn_create(&c, &ctx) == CN_ERR_BAD_CONFIG && ctx == NULL);
    cn_config_default(&c);
    c.std[1] = 0.0;
    CHECK(cn_config_check(&c) == CN_ERR_BAD_CONFIG);
    cn_config_default(&c);
    c.resize = CN_RESIZE_KEEP_RES;
    c.pad = 30;
    CHECK(cn_config_check(&c) == CN_ERR_BAD_CONFIG);
    c.pad = 31;
    CHECK(cn_config_check(&c) == CN_OK);
    cn_config_default(&c);
    c.peak_kernel = 2;
    CHECK(cn_config_check(&c) == CN_ERR_BAD_CONFIG);
    cn_config_default(&c);
    CHECK(cn_context_init(small, sizeof small, &c, &ctx) == CN_ERR_BUFFER_TOO_SMALL);
    CHECK(cn_context_init(NULL, 0, &c, &ctx) == CN_ERR_NULL_ARGUMENT);
    CHECK(cn_create(&c, &ctx) == CN_OK && ctx != NULL);
    CHECK(cn_context_config(ctx)->k == 100);
    cn_destroy(ctx);
    cn_destroy(NULL);
}

static void test_transforms(void)
{
    cn_config c;
    cn_context *ctx;
    cn_transform t;
    cn_config_default(&c);
    ctx = make(&c);
    CHECK(cn_transform_for_image(ctx, 640, 480, &t) == CN_OK);
    /* affine: s = 640, ratio = 640 / 128 = 5, offset_x = 320 - 320, offset_y = 240 - 5 * 128 / 2 */
    CHECK(t.output_width == 128 && t.output_height == 128);
    CHECK(t.scale_x == 5.0f && t.scale_y == 5.0f && t.offset_x == 0.0f && t.offset_y == -80.0f);
    CHECK(cn_transform_for_image(ctx, 0, 480, &t) == CN_ERR_INVALID_ARGUMENT);
    CHECK(cn_transform_for_image(ctx, 640, CN_MAX_IMAGE_SIDE + 1, &t) == CN_ERR_INVALID_ARGUMENT);
    CHECK(cn_transform_for_image(NULL, 640, 480, &t) == CN_ERR_NULL_ARGUMENT);
    c.resize = CN_RESIZE_KEEP_RES;
    ctx = make(&c);
    CHECK(cn_transform_for_image(ctx, 13, 9, &t) == CN_OK);
    /* keep_res: 32x32 input, s = 32, ratio 4, centre (6, 4): offset_x = 6 - 16, offset_y = 4 - 16 */
    CHECK(t.input_width == 32 && t.input_height == 32 && t.output_width == 8);
    CHECK(t.scale_x == 4.0f && t.offset_x == -10.0f && t.offset_y == -12.0f);
}

static void test_keep_res_preprocess_is_a_centred_copy(void)
{
    cn_config c;
    cn_context *ctx;
    cn_image img;
    cn_transform t;
    static uint8_t pixels[3 * 5 * 4], out[32 * 32 * 3];
    static float net[3 * 32 * 32];
    int i;
    cn_config_default(&c);
    c.resize = CN_RESIZE_KEEP_RES;
    c.color = CN_COLOR_RGB;
    c.scale = 1.0;
    c.mean[0] = c.mean[1] = c.mean[2] = 0.0;
    c.std[0] = c.std[1] = c.std[2] = 1.0;
    ctx = make(&c);
    for (i = 0; i < (int)sizeof pixels; ++i) pixels[i] = (uint8_t)(i + 1);
    img.data = pixels;
    img.width = 5;
    img.height = 3;
    img.stride_bytes = 4 * 5;
    img.format = CN_PIXEL_BGRA;
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_UINT8_NHWC_BGR, 0.0f, 0, out, sizeof out, &t) == CN_OK);
    /* top = 16 - 1 = 15, left = 16 - 2 = 14 */
    CHECK(out[(15 * 32 + 14) * 3 + 0] == 1 && out[(15 * 32 + 14) * 3 + 2] == 3);
    CHECK(out[(17 * 32 + 18) * 3 + 1] == pixels[2 * 20 + 4 * 4 + 1]);
    CHECK(out[(14 * 32 + 14) * 3] == 0 && out[(15 * 32 + 19) * 3] == 0);
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_FLOAT32_NCHW, 0.0f, 0, net, sizeof net, &t) == CN_OK);
    /* network order RGB: channel 0 is the source's R (byte 2) */
    CHECK(net[15 * 32 + 14] == 3.0f && net[2 * 32 * 32 + 15 * 32 + 14] == 1.0f);
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_FLOAT32_NCHW, 0.0f, 0, net, sizeof net - 4, &t) ==
          CN_ERR_BUFFER_TOO_SMALL);
    img.stride_bytes = 4 * 5 - 1;
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_FLOAT32_NCHW, 0.0f, 0, net, sizeof net, &t) == CN_ERR_INVALID_ARGUMENT);
    img.stride_bytes = 20;
    img.format = 9;
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_FLOAT32_NCHW, 0.0f, 0, net, sizeof net, &t) == CN_ERR_INVALID_ARGUMENT);
    img.format = CN_PIXEL_BGR;
    CHECK(cn_preprocess(ctx, &img, 7, 0.0f, 0, net, sizeof net, &t) == CN_ERR_INVALID_ARGUMENT);
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_INT8_NCHW, 0.5f, 200, net, sizeof net, &t) == CN_ERR_INVALID_ARGUMENT);
    img.data = NULL;
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_FLOAT32_NCHW, 0.0f, 0, net, sizeof net, &t) == CN_ERR_NULL_ARGUMENT);
}

static void test_affine_warp_of_a_constant_image(void)
{
    cn_config c;
    cn_context *ctx;
    cn_image img;
    static uint8_t pixels[40 * 40 * 3], out[64 * 64 * 3];
    cn_config_default(&c);
    c.input_width = c.input_height = 64;
    ctx = make(&c);
    memset(pixels, 77, sizeof pixels);
    img.data = pixels;
    img.width = 40;
    img.height = 20; /* wider than tall: the rows above and below the image are border (0) */
    img.stride_bytes = 40 * 3;
    img.format = CN_PIXEL_BGR;
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_UINT8_NHWC_BGR, 0.0f, 0, out, sizeof out, NULL) == CN_OK);
    CHECK(out[(32 * 64 + 32) * 3] == 77 && out[(32 * 64 + 5) * 3 + 2] == 77);
    CHECK(out[(2 * 64 + 32) * 3] == 0 && out[(61 * 64 + 32) * 3] == 0);
    c.resize = CN_RESIZE_STRETCH;
    ctx = make(&c);
    CHECK(cn_preprocess(ctx, &img, CN_TENSOR_UINT8_NHWC_BGR, 0.0f, 0, out, sizeof out, NULL) == CN_ERR_UNSUPPORTED);
}

/* 1 class, 4x4 heads, stride 4, keep_res on a 16x16 image... use a 13x13 image: input 32 -> 8x8 heads. */
static void test_postprocess_peaks_ties_and_decode(void)
{
    cn_config c;
    cn_context *ctx;
    cn_transform t;
    cn_heads h;
    cn_detection d[8];
    static float heat[2 * 8 * 8], wh[2 * 8 * 8], reg[2 * 8 * 8];
    uint16_t heat16[2 * 8 * 8];
    int8_t heat8[2 * 8 * 8];
    int counts[1], i;
    cn_config_default(&c);
    c.resize = CN_RESIZE_KEEP_RES;
    c.num_classes = 2;
    c.k = 4;
    ctx = make(&c);
    CHECK(cn_transform_for_image(ctx, 13, 13, &t) == CN_OK); /* 32x32 input, offset 6 - 16 = -10 */
    for (i = 0; i < 2 * 64; ++i) {
        wh[i] = 2.0f;
        reg[i] = 0.25f;
    }
    heat[0 * 64 + 3 * 8 + 3] = 0.9f;  /* class 0 peak at (x3, y3) */
    heat[0 * 64 + 3 * 8 + 4] = 0.8f;  /* its neighbour: suppressed to 0 */
    heat[1 * 64 + 6 * 8 + 1] = 0.9f;  /* class 1: same score as class 0's peak -> ranks after it */
    heat[1 * 64 + 0 * 8 + 7] = 0.5f;
    memset(&h, 0, sizeof h);
    h.heatmap.data = heat;
    h.wh.data = wh;
    h.reg.data = reg;
    h.batch = 1;
    h.height = h.width = 8;
    CHECK(cn_postprocess(ctx, &h, &t, -INFINITY, d, 4, counts) == CN_OK);
    CHECK(counts[0] == 4);
    CHECK(d[0].class_id == 0 && d[0].score == 0.9f && d[1].class_id == 1 && d[1].score == 0.9f);
    CHECK(d[2].class_id == 1 && d[2].score == 0.5f);
    /* then the zeros, lowest class and position first: class 0, position 0 */
    CHECK(d[3].score == 0.0f && d[3].class_id == 0 && d[3].x1 == (0.25f - 1.0f) * 4.0f - 10.0f);
    /* box of the first: centre 3.25, half size 1, * 4 - 10 */
    CHECK(d[0].x1 == (3.25f - 1.0f) * 4.0f - 10.0f && d[0].y2 == (3.25f + 1.0f) * 4.0f - 10.0f);
    CHECK(cn_postprocess(ctx, &h, &t, 0.6f, d, 4, counts) == CN_OK && counts[0] == 2);
    CHECK(cn_postprocess(ctx, &h, &t, 0.6f, d, 3, counts) == CN_ERR_BUFFER_TOO_SMALL);
    /* the same heads as fp16 and int8 */
    for (i = 0; i < 2 * 64; ++i) {
        heat16[i] = heat[i] == 0.9f ? 0x3b33 : heat[i] == 0.8f ? 0x3a66 : heat[i] == 0.5f ? 0x3800 : 0;
        heat8[i] = (int8_t)(heat[i] * 100.0f + 0.5f);
    }
    h.heatmap.data = heat16;
    h.heatmap.dtype = CN_DTYPE_FLOAT16;
    CHECK(cn_postprocess(ctx, &h, &t, -INFINITY, d, 4, counts) == CN_OK);
    CHECK(d[0].class_id == 0 && fabsf(d[0].score - 0.9f) < 1e-3f && d[2].score == 0.5f);
    h.heatmap.data = heat8;
    h.heatmap.dtype = CN_DTYPE_INT8;
    h.heatmap.scale = 0.01f;
    h.heatmap.zero_point = 0;
    CHECK(cn_postprocess(ctx, &h, &t, -INFINITY, d, 4, counts) == CN_OK);
    CHECK(d[0].class_id == 0 && d[1].class_id == 1 && d[2].score == 50 * 0.01f);
    h.heatmap.scale = 0.0f;
    CHECK(cn_postprocess(ctx, &h, &t, -INFINITY, d, 4, counts) == CN_ERR_INVALID_ARGUMENT);
    h.heatmap.scale = 0.01f;
    h.width = 7;
    CHECK(cn_postprocess(ctx, &h, &t, -INFINITY, d, 4, counts) == CN_ERR_SHAPE_MISMATCH);
    h.width = 8;
    h.reg.data = NULL;
    CHECK(cn_postprocess(ctx, &h, &t, -INFINITY, d, 4, counts) == CN_ERR_NULL_ARGUMENT);
    CHECK(cn_postprocess(ctx, NULL, &t, -INFINITY, d, 4, counts) == CN_ERR_NULL_ARGUMENT);
}

static void test_static_context_placement(void)
{
    cn_config c;
    cn_context *ctx = NULL;
    cn_config_default(&c);
    CHECK(cn_context_size(&c) > sizeof(cn_config));
    CHECK(cn_context_init(arena + 1, sizeof arena - 1, &c, &ctx) == CN_ERR_INVALID_ARGUMENT ||
          ((size_t)(arena + 1) & 15u) == 0);
}

int main(void)
{
    test_version_and_status();
    test_config_checks();
    test_transforms();
    test_keep_res_preprocess_is_a_centred_copy();
    test_affine_warp_of_a_constant_image();
    test_postprocess_peaks_ties_and_decode();
    test_static_context_placement();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
