/* Version, status strings, configuration checks, contexts and transforms. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cn_internal.h"

#define CN_STR2(x) #x
#define CN_STR(x) CN_STR2(x)

const char *cn_version(void)
{
    return CN_STR(CN_VERSION_MAJOR) "." CN_STR(CN_VERSION_MINOR) "." CN_STR(CN_VERSION_PATCH);
}

int cn_abi_version(void) { return CN_ABI_VERSION; }

const char *cn_status_string(cn_status status)
{
    switch (status) {
    case CN_OK: return "ok";
    case CN_ERR_NULL_ARGUMENT: return "a required pointer argument is NULL";
    case CN_ERR_INVALID_ARGUMENT: return "an argument is out of range";
    case CN_ERR_BAD_CONFIG: return "the model configuration is invalid or from another ABI version";
    case CN_ERR_UNSUPPORTED: return "the operation is not supported for this configuration";
    case CN_ERR_BUFFER_TOO_SMALL: return "an output buffer or the context memory is too small";
    case CN_ERR_SHAPE_MISMATCH: return "tensor shapes disagree with the configuration or the transform";
    }
    return "unknown status code";
}

cn_status cn_config_default(cn_config *config)
{
    static const double mean[3] = {0.40789654, 0.44719302, 0.47026115};
    static const double std_[3] = {0.28863828, 0.27408164, 0.27809835};
    if (!config) return CN_ERR_NULL_ARGUMENT;
    memset(config, 0, sizeof *config);
    config->abi_version = CN_ABI_VERSION;
    config->resize = CN_RESIZE_AFFINE;
    config->input_height = 512;
    config->input_width = 512;
    config->pad = 31;
    config->color = CN_COLOR_BGR;
    config->scale = 1.0 / 255.0;
    memcpy(config->mean, mean, sizeof mean);
    memcpy(config->std, std_, sizeof std_);
    config->num_classes = 80;
    config->stride = 4;
    config->k = 100;
    config->topk = CN_TOPK_TWO_STAGE;
    config->peak_kernel = 3;
    config->heatmap_activation = CN_HEATMAP_SIGMOID;
    config->reg_offset = 1;
    config->back_projection = CN_BACK_AFFINE_INVERSE;
    return CN_OK;
}

cn_status cn_config_check(const cn_config *c)
{
    int i;
    if (!c) return CN_ERR_NULL_ARGUMENT;
    if (c->abi_version != CN_ABI_VERSION) return CN_ERR_BAD_CONFIG;
    if (c->resize < CN_RESIZE_AFFINE || c->resize > CN_RESIZE_STRETCH) return CN_ERR_BAD_CONFIG;
    if (c->resize == CN_RESIZE_KEEP_RES) {
        if (c->pad < 0 || c->pad > 4095 || ((c->pad + 1) & c->pad) != 0) return CN_ERR_BAD_CONFIG;
    } else if (c->input_height <= 0 || c->input_width <= 0 || c->input_height > CN_MAX_IMAGE_SIDE ||
               c->input_width > CN_MAX_IMAGE_SIDE) {
        return CN_ERR_BAD_CONFIG;
    }
    if (c->color != CN_COLOR_BGR && c->color != CN_COLOR_RGB) return CN_ERR_BAD_CONFIG;
    if (!(c->scale > 0.0) || !isfinite(c->scale)) return CN_ERR_BAD_CONFIG;
    for (i = 0; i < 3; ++i) {
        if (!isfinite(c->mean[i]) || !isfinite(c->std[i]) || c->std[i] == 0.0) return CN_ERR_BAD_CONFIG;
    }
    if (c->num_classes <= 0 || c->num_classes > 65535) return CN_ERR_BAD_CONFIG;
    if (c->stride <= 0 || c->stride > 1024) return CN_ERR_BAD_CONFIG;
    if (c->resize != CN_RESIZE_KEEP_RES &&
        (c->input_height < c->stride || c->input_width < c->stride)) return CN_ERR_BAD_CONFIG;
    if (c->k < 1 || c->k > CN_MAX_K) return CN_ERR_BAD_CONFIG;
    if (c->topk != CN_TOPK_TWO_STAGE && c->topk != CN_TOPK_SINGLE) return CN_ERR_BAD_CONFIG;
    if (c->peak_kernel < 1 || c->peak_kernel > 31 || c->peak_kernel % 2 != 1) return CN_ERR_BAD_CONFIG;
    if (c->heatmap_activation != CN_HEATMAP_LOGITS && c->heatmap_activation != CN_HEATMAP_SIGMOID)
        return CN_ERR_BAD_CONFIG;
    if (c->reg_offset != 0 && c->reg_offset != 1) return CN_ERR_BAD_CONFIG;
    if (c->back_projection != CN_BACK_AFFINE_INVERSE && c->back_projection != CN_BACK_BORDER_SHIFT)
        return CN_ERR_BAD_CONFIG;
    return CN_OK;
}

static size_t align16(size_t n) { return (n + 15u) & ~(size_t)15u; }

/* Byte offsets of the context's arrays inside its block. */
typedef struct layout {
    size_t col_first, col_second, col_frac, row_first, row_second, row_frac, row_pixels, heap, total;
} layout;

static layout context_layout(const cn_config *c)
{
    layout l;
    size_t cols = c->resize == CN_RESIZE_AFFINE ? (size_t)c->input_width : 0;
    size_t rows = c->resize == CN_RESIZE_AFFINE ? (size_t)c->input_height : 0;
    size_t at = align16(sizeof(struct cn_context));
    l.col_first = at; at = align16(at + cols * sizeof(int32_t));
    l.col_second = at; at = align16(at + cols * sizeof(int32_t));
    l.col_frac = at; at = align16(at + cols * sizeof(float));
    l.row_first = at; at = align16(at + rows * sizeof(int32_t));
    l.row_second = at; at = align16(at + rows * sizeof(int32_t));
    l.row_frac = at; at = align16(at + rows * sizeof(float));
    l.row_pixels = at; at = align16(at + cols * 3u);
    l.heap = at; at = align16(at + (size_t)c->k * sizeof(cn_candidate));
    l.total = at;
    return l;
}

size_t cn_context_size(const cn_config *config)
{
    if (cn_config_check(config) != CN_OK) return 0;
    return context_layout(config).total;
}

cn_status cn_context_init(void *memory, size_t size, const cn_config *config, cn_context **out)
{
    cn_context *ctx;
    unsigned char *base = (unsigned char *)memory;
    layout l;
    int i;
    cn_status st;
    if (!memory || !config || !out) return CN_ERR_NULL_ARGUMENT;
    *out = NULL;
    st = cn_config_check(config);
    if (st != CN_OK) return st;
    if (((uintptr_t)memory & 15u) != 0) return CN_ERR_INVALID_ARGUMENT;
    l = context_layout(config);
    if (size < l.total) return CN_ERR_BUFFER_TOO_SMALL;
    memset(memory, 0, l.total);
    ctx = (cn_context *)memory;
    ctx->config = *config;
    for (i = 0; i < 3; ++i) {
        /* Same double arithmetic as the graph's constants and the numpy reference, then one rounding. */
        ctx->mul[i] = (float)(config->scale / config->std[i]);
        ctx->add[i] = (float)(-config->mean[i] / config->std[i]);
    }
    ctx->col_first = (int32_t *)(void *)(base + l.col_first);
    ctx->col_second = (int32_t *)(void *)(base + l.col_second);
    ctx->col_frac = (float *)(void *)(base + l.col_frac);
    ctx->row_first = (int32_t *)(void *)(base + l.row_first);
    ctx->row_second = (int32_t *)(void *)(base + l.row_second);
    ctx->row_frac = (float *)(void *)(base + l.row_frac);
    ctx->row_pixels = base + l.row_pixels;
    ctx->heap = (cn_candidate *)(void *)(base + l.heap);
    *out = ctx;
    return CN_OK;
}

cn_status cn_create(const cn_config *config, cn_context **out)
{
    size_t size;
    void *memory;
    cn_status st;
    if (!config || !out) return CN_ERR_NULL_ARGUMENT;
    *out = NULL;
    st = cn_config_check(config);
    if (st != CN_OK) return st;
    size = cn_context_size(config);
    memory = malloc(size); /* malloc's alignment covers the 16 bytes asked for on every C99 target we build */
    if (!memory) return CN_ERR_BUFFER_TOO_SMALL;
    if (((uintptr_t)memory & 15u) != 0) {
        free(memory);
        return CN_ERR_UNSUPPORTED;
    }
    st = cn_context_init(memory, size, config, out);
    if (st != CN_OK) {
        free(memory);
        return st;
    }
    (*out)->owned = 1;
    return CN_OK;
}

void cn_destroy(cn_context *context)
{
    if (context && context->owned) free(context);
}

const cn_config *cn_context_config(const cn_context *context) { return context ? &context->config : NULL; }

static int valid_image_size(int width, int height)
{
    return width > 0 && height > 0 && width <= CN_MAX_IMAGE_SIDE && height <= CN_MAX_IMAGE_SIDE;
}

cn_status cn_transform_for_image(const cn_context *context, int image_width, int image_height, cn_transform *out)
{
    const cn_config *c;
    float s, cx, cy, ratio;
    if (!context || !out) return CN_ERR_NULL_ARGUMENT;
    if (!valid_image_size(image_width, image_height)) return CN_ERR_INVALID_ARGUMENT;
    c = &context->config;
    memset(out, 0, sizeof *out);
    out->image_width = image_width;
    out->image_height = image_height;
    if (c->resize == CN_RESIZE_KEEP_RES) {
        out->input_width = (image_width | c->pad) + 1;
        out->input_height = (image_height | c->pad) + 1;
    } else {
        out->input_width = c->input_width;
        out->input_height = c->input_height;
    }
    out->output_width = out->input_width / c->stride;
    out->output_height = out->input_height / c->stride;
    if (out->output_width <= 0 || out->output_height <= 0) return CN_ERR_INVALID_ARGUMENT;
    if (c->resize == CN_RESIZE_STRETCH) {
        out->scale_x = (float)((double)c->stride * image_width / out->input_width);
        out->scale_y = (float)((double)c->stride * image_height / out->input_height);
        out->offset_x = 0.0f;
        out->offset_y = 0.0f;
        return CN_OK;
    }
    /* Closed form of the official transform_preds, in the exported graph's float32 operation order. */
    if (c->resize == CN_RESIZE_KEEP_RES) {
        s = (float)out->input_width;
        cx = (float)(image_width / 2);
        cy = (float)(image_height / 2);
    } else {
        s = (float)(image_width > image_height ? image_width : image_height);
        cx = (float)image_width * 0.5f;
        cy = (float)image_height * 0.5f;
    }
    ratio = s / (float)out->output_width;
    out->scale_x = ratio;
    out->scale_y = ratio;
    out->offset_x = cx - s * 0.5f;
    out->offset_y = cy - ratio * (float)out->output_height * 0.5f;
    return CN_OK;
}
