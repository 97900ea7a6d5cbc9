/* Image -> network input: the official affine warp (or keep_res padding), colour order, mean/std.
 *
 * The warp follows the exported graph (export/graph.py, AffineWarp) operation by operation, which in
 * turn reproduces OpenCV 5's cv2.warpAffine(INTER_LINEAR, constant 0 border): source coordinates
 * u * scale + t in float32, taps clamped into a one-pixel zero border, interpolation along x then y as
 * p0 + a * (p1 - p0) in float32, then round half to even and saturate to uint8.
 */
#include <math.h>
#include <string.h>

#include "cn_internal.h"

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF /* a fused multiply-add would round differently from the graph */
#endif

typedef struct source {
    const uint8_t *data;
    int width, height;
    size_t stride;
    int bpp;        /* bytes per pixel */
    int chan[3];    /* byte offset of B, G, R inside a pixel */
    uint8_t border;
} source;

static cn_status describe_source(const cn_image *img, const cn_config *c, source *src)
{
    int bpp;
    if (img->format == CN_PIXEL_BGR || img->format == CN_PIXEL_RGB) bpp = 3;
    else if (img->format == CN_PIXEL_BGRA) bpp = 4;
    else if (img->format == CN_PIXEL_GRAY) bpp = 1;
    else return CN_ERR_INVALID_ARGUMENT;
    if (img->width <= 0 || img->height <= 0 || img->width > CN_MAX_IMAGE_SIDE || img->height > CN_MAX_IMAGE_SIDE)
        return CN_ERR_INVALID_ARGUMENT;
    if (img->stride_bytes < (size_t)img->width * (size_t)bpp) return CN_ERR_INVALID_ARGUMENT;
    src->data = img->data;
    src->width = img->width;
    src->height = img->height;
    src->stride = img->stride_bytes;
    src->bpp = bpp;
    if (img->format == CN_PIXEL_RGB) {
        src->chan[0] = 2; src->chan[1] = 1; src->chan[2] = 0;
    } else if (img->format == CN_PIXEL_GRAY) {
        src->chan[0] = 0; src->chan[1] = 0; src->chan[2] = 0;
    } else {
        src->chan[0] = 0; src->chan[1] = 1; src->chan[2] = 2;
    }
    (void)c;
    src->border = 0;
    return CN_OK;
}

/* Taps around one source coordinate, as indices into the source padded by one border pixel per side. */
static void taps(float coord, int size, int32_t *first, int32_t *second, float *frac)
{
    float low = floorf(coord);
    float a = low, b = low + 1.0f;
    *frac = coord - low;
    if (a < -1.0f) a = -1.0f;
    if (a > (float)size) a = (float)size;
    if (b < -1.0f) b = -1.0f;
    if (b > (float)size) b = (float)size;
    *first = (int32_t)a + 1;
    *second = (int32_t)b + 1;
}

static void build_tables(cn_context *ctx, int width, int height)
{
    const cn_config *c = &ctx->config;
    float fw = (float)width, fh = (float)height;
    float s = fw > fh ? fw : fh;
    /* The inverse map's coefficients as the graph computes them (each one correctly rounded). */
    float scale = s / (float)c->input_width;
    float tx = (fw - s) * 0.5f;
    float ty = (fh * (float)c->input_width - s * (float)c->input_height) / (float)(2 * c->input_width);
    int i;
    for (i = 0; i < c->input_width; ++i) {
        float coord = (float)i * scale;
        coord = coord + tx;
        taps(coord, width, &ctx->col_first[i], &ctx->col_second[i], &ctx->col_frac[i]);
    }
    for (i = 0; i < c->input_height; ++i) {
        float coord = (float)i * scale;
        coord = coord + ty;
        taps(coord, height, &ctx->row_first[i], &ctx->row_second[i], &ctx->row_frac[i]);
    }
}

/* Channel ch (0 B, 1 G, 2 R) of padded pixel (px) in a padded row (NULL: a border row). */
static float padded_pixel(const source *src, const uint8_t *row, int32_t px, int ch)
{
    if (!row || px <= 0 || px > src->width) return (float)src->border;
    return (float)row[(size_t)(px - 1) * (size_t)src->bpp + (size_t)src->chan[ch]];
}

static const uint8_t *padded_row(const source *src, int32_t py)
{
    if (py <= 0 || py > src->height) return NULL;
    return src->data + (size_t)(py - 1) * src->stride;
}

static uint8_t to_u8(float v)
{
    v = rintf(v); /* round half to even in the default rounding mode, as ONNX Round and cv2 */
    if (v < 0.0f) v = 0.0f;
    if (v > 255.0f) v = 255.0f;
    return (uint8_t)v;
}

/* One warped output row (BGR bytes) of the affine transform. */
static void warp_row(const cn_context *ctx, const source *src, int v, uint8_t *out)
{
    int u, ch, width = ctx->config.input_width;
    const uint8_t *top = padded_row(src, ctx->row_first[v]);
    const uint8_t *bottom = padded_row(src, ctx->row_second[v]);
    float ay = ctx->row_frac[v];
    if (!top && !bottom) {
        memset(out, src->border, (size_t)width * 3u);
        return;
    }
    for (u = 0; u < width; ++u) {
        int32_t x0 = ctx->col_first[u], x1 = ctx->col_second[u];
        float ax = ctx->col_frac[u];
        for (ch = 0; ch < 3; ++ch) {
            float tl = padded_pixel(src, top, x0, ch), tr = padded_pixel(src, top, x1, ch);
            float bl = padded_pixel(src, bottom, x0, ch), br = padded_pixel(src, bottom, x1, ch);
            float upper = tl + ax * (tr - tl);
            float lower = bl + ax * (br - bl);
            out[3 * u + ch] = to_u8(upper + ay * (lower - upper));
        }
    }
}

/* One keep_res output row: the source row shifted by the centring offsets, zero elsewhere. */
static void pad_row(const source *src, int v, int top, int left, int width, uint8_t *out)
{
    int y = v - top, u, ch;
    memset(out, src->border, (size_t)width * 3u);
    if (y < 0 || y >= src->height) return;
    for (u = 0; u < src->width; ++u) {
        const uint8_t *p = src->data + (size_t)y * src->stride + (size_t)u * (size_t)src->bpp;
        for (ch = 0; ch < 3; ++ch) out[3 * (left + u) + ch] = p[src->chan[ch]];
    }
}

typedef struct sink {
    int type;
    void *data;
    int width, height;
    float mul[3], add[3];   /* network channel order */
    int bgr_of[3];          /* network channel -> BGR channel */
    float qscale;
    int qzero, qmin, qmax;
} sink;

static int quantize(float x, const sink *k)
{
    float q = rintf(x / k->qscale);
    float lo = (float)(k->qmin - k->qzero), hi = (float)(k->qmax - k->qzero);
    if (!(q >= lo)) q = lo; /* NaN saturates low */
    if (q > hi) q = hi;
    return (int)q + k->qzero;
}

static void emit_row(const sink *k, int v, const uint8_t *bgr)
{
    size_t plane = (size_t)k->width * (size_t)k->height;
    int u, j;
    if (k->type == CN_TENSOR_UINT8_NHWC_BGR) {
        memcpy((uint8_t *)k->data + (size_t)v * (size_t)k->width * 3u, bgr, (size_t)k->width * 3u);
        return;
    }
    for (j = 0; j < 3; ++j) {
        size_t base = (size_t)j * plane + (size_t)v * (size_t)k->width;
        int b = k->bgr_of[j];
        float mul = k->mul[j], add = k->add[j];
        if (k->type == CN_TENSOR_FLOAT32_NCHW) {
            float *o = (float *)k->data + base;
            for (u = 0; u < k->width; ++u) {
                float x = (float)bgr[3 * u + b] * mul;
                o[u] = x + add;
            }
        } else if (k->type == CN_TENSOR_INT8_NCHW) {
            int8_t *o = (int8_t *)k->data + base;
            for (u = 0; u < k->width; ++u) {
                float x = (float)bgr[3 * u + b] * mul;
                o[u] = (int8_t)quantize(x + add, k);
            }
        } else {
            uint8_t *o = (uint8_t *)k->data + base;
            for (u = 0; u < k->width; ++u) {
                float x = (float)bgr[3 * u + b] * mul;
                o[u] = (uint8_t)quantize(x + add, k);
            }
        }
    }
}

/* One keep_res row of a normalised tensor, read straight from the source (the canvas is per image). */
static void emit_padded_row(const sink *k, const source *src, int v, int top, int left)
{
    size_t plane = (size_t)k->width * (size_t)k->height;
    int y = v - top, u, j;
    for (j = 0; j < 3; ++j) {
        size_t base = (size_t)j * plane + (size_t)v * (size_t)k->width;
        const uint8_t *row = (y >= 0 && y < src->height) ? src->data + (size_t)y * src->stride : NULL;
        int b = src->chan[k->bgr_of[j]];
        for (u = 0; u < k->width; ++u) {
            int x = u - left;
            float px = (row && x >= 0 && x < src->width) ? (float)row[(size_t)x * (size_t)src->bpp + (size_t)b]
                                                         : (float)src->border;
            float val = px * k->mul[j];
            val = val + k->add[j];
            if (k->type == CN_TENSOR_FLOAT32_NCHW) ((float *)k->data)[base + (size_t)u] = val;
            else if (k->type == CN_TENSOR_INT8_NCHW) ((int8_t *)k->data)[base + (size_t)u] = (int8_t)quantize(val, k);
            else ((uint8_t *)k->data)[base + (size_t)u] = (uint8_t)quantize(val, k);
        }
    }
}

static size_t element_bytes(int tensor_type)
{
    return tensor_type == CN_TENSOR_FLOAT32_NCHW ? 4u : 1u;
}

cn_status cn_input_bytes(const cn_context *context, int image_width, int image_height, int tensor_type,
                         size_t *bytes)
{
    cn_transform t;
    cn_status st;
    if (!context || !bytes) return CN_ERR_NULL_ARGUMENT;
    if (tensor_type < CN_TENSOR_FLOAT32_NCHW || tensor_type > CN_TENSOR_UINT8_NHWC_BGR)
        return CN_ERR_INVALID_ARGUMENT;
    st = cn_transform_for_image(context, image_width, image_height, &t);
    if (st != CN_OK) return st;
    *bytes = (size_t)t.input_width * (size_t)t.input_height * 3u * element_bytes(tensor_type);
    return CN_OK;
}

cn_status cn_preprocess(cn_context *context, const cn_image *image, int tensor_type, float quant_scale,
                        int quant_zero_point, void *out, size_t out_bytes, cn_transform *transform)
{
    const cn_config *c;
    source src;
    sink k;
    cn_transform t;
    size_t need;
    cn_status st;
    int v, j;
    if (!context || !image || !out) return CN_ERR_NULL_ARGUMENT;
    if (!image->data) return CN_ERR_NULL_ARGUMENT;
    c = &context->config;
    st = describe_source(image, c, &src);
    if (st != CN_OK) return st;
    if (c->resize == CN_RESIZE_STRETCH) return CN_ERR_UNSUPPORTED;
    st = cn_input_bytes(context, image->width, image->height, tensor_type, &need);
    if (st != CN_OK) return st;
    if (out_bytes < need) return CN_ERR_BUFFER_TOO_SMALL;
    memset(&k, 0, sizeof k);
    k.type = tensor_type;
    if (tensor_type == CN_TENSOR_INT8_NCHW || tensor_type == CN_TENSOR_UINT8_NCHW) {
        if (!(quant_scale > 0.0f) || !isfinite(quant_scale)) return CN_ERR_INVALID_ARGUMENT;
        k.qmin = tensor_type == CN_TENSOR_INT8_NCHW ? -128 : 0;
        k.qmax = tensor_type == CN_TENSOR_INT8_NCHW ? 127 : 255;
        if (quant_zero_point < k.qmin || quant_zero_point > k.qmax) return CN_ERR_INVALID_ARGUMENT;
        k.qscale = quant_scale;
        k.qzero = quant_zero_point;
    }
    st = cn_transform_for_image(context, image->width, image->height, &t);
    if (st != CN_OK) return st;
    k.data = out;
    k.width = t.input_width;
    k.height = t.input_height;
    for (j = 0; j < 3; ++j) {
        k.bgr_of[j] = c->color == CN_COLOR_RGB ? 2 - j : j;
        k.mul[j] = context->mul[j];
        k.add[j] = context->add[j];
    }
    if (c->resize == CN_RESIZE_AFFINE) {
        build_tables(context, image->width, image->height);
        for (v = 0; v < t.input_height; ++v) {
            warp_row(context, &src, v, context->row_pixels);
            emit_row(&k, v, context->row_pixels);
        }
    } else {
        /* keep_res: an integer translation onto a zero canvas, so pixels are copied, never interpolated. */
        int top = t.input_height / 2 - image->height / 2;
        int left = t.input_width / 2 - image->width / 2;
        for (v = 0; v < t.input_height; ++v) {
            if (tensor_type == CN_TENSOR_UINT8_NHWC_BGR)
                pad_row(&src, v, top, left, t.input_width, (uint8_t *)out + (size_t)v * (size_t)t.input_width * 3u);
            else
                emit_padded_row(&k, &src, v, top, left);
        }
    }
    if (transform) *transform = t;
    return CN_OK;
}
