/* Heads -> detections: peak NMS, top-K, decode and back-projection, as the exported graph computes them.
 *
 * Peaks: a cell keeps its score when no cell of its k x k window is larger (the graph's
 * heat * (hmax == heat)); every other cell scores 0 and still takes part in the top-K, as in the graph.
 * Top-K: candidates ordered by score (desc), then class, then row-major position (asc), which is the
 * order ONNX TopK gives ties. Under that total order the official two-stage top-K (K per class, then K
 * overall) and mmdet's single top-K over C*H*W select the same rows in the same order: a row in the
 * overall top K is always within the top K of its class. So one bounded heap serves both schemes.
 * Non-finite inputs: a NaN heatmap value counts as -infinity (never a peak above a finite score).
 */
#include <math.h>
#include <string.h>

#include "cn_internal.h"

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) & 1u, exp = (uint32_t)(h >> 10) & 31u, man = (uint32_t)h & 1023u;
    float v;
    if (exp == 0) v = ldexpf((float)man, -24);                       /* zero and subnormals */
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = ldexpf((float)(man | 1024u), (int)exp - 25);
    return sign ? -v : v;
}

typedef struct view {
    const cn_tensor *t;
    int channels, height, width;
    size_t item;  /* elements per batch item */
} view;

static size_t offset_of(const view *v, int b, int c, int y, int x)
{
    if (v->t->layout == CN_LAYOUT_NHWC)
        return (size_t)b * v->item + ((size_t)y * (size_t)v->width + (size_t)x) * (size_t)v->channels + (size_t)c;
    return (size_t)b * v->item + ((size_t)c * (size_t)v->height + (size_t)y) * (size_t)v->width + (size_t)x;
}

static float load(const cn_tensor *t, size_t i)
{
    switch (t->dtype) {
    case CN_DTYPE_FLOAT32: return ((const float *)t->data)[i];
    case CN_DTYPE_FLOAT16: return half_to_float(((const uint16_t *)t->data)[i]);
    case CN_DTYPE_INT8: return (float)((int)((const int8_t *)t->data)[i] - t->zero_point) * t->scale;
    default: return (float)((int)((const uint8_t *)t->data)[i] - t->zero_point) * t->scale;
    }
}

/* The heatmap probability of one cell (sigmoid applied when the heads are logits). */
static float heat_at(const view *v, int logits, int b, int c, int y, int x)
{
    float raw = load(v->t, offset_of(v, b, c, y, x));
    if (logits) raw = 1.0f / (1.0f + expf(-raw));
    return raw != raw ? -INFINITY : raw;
}

static int is_peak(const view *v, int logits, int radius, int b, int c, int y, int x, float value)
{
    int dy, dx;
    for (dy = -radius; dy <= radius; ++dy) {
        int yy = y + dy;
        if (yy < 0 || yy >= v->height) continue;
        for (dx = -radius; dx <= radius; ++dx) {
            int xx = x + dx;
            if (xx < 0 || xx >= v->width || (dx == 0 && dy == 0)) continue;
            if (heat_at(v, logits, b, c, yy, xx) > value) return 0;
        }
    }
    return 1;
}

/* a ranks below b (a is the worse detection). */
static int worse(const cn_candidate *a, const cn_candidate *b)
{
    if (a->value != b->value) return a->value < b->value;
    if (a->class_id != b->class_id) return a->class_id > b->class_id;
    return a->position > b->position;
}

static void sift_down(cn_candidate *heap, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        cn_candidate tmp;
        if (l < n && worse(&heap[l], &heap[m])) m = l;
        if (r < n && worse(&heap[r], &heap[m])) m = r;
        if (m == i) return;
        tmp = heap[i]; heap[i] = heap[m]; heap[m] = tmp;
        i = m;
    }
}

static void sift_up(cn_candidate *heap, int i)
{
    while (i > 0) {
        int p = (i - 1) / 2;
        cn_candidate tmp;
        if (!worse(&heap[i], &heap[p])) return;
        tmp = heap[i]; heap[i] = heap[p]; heap[p] = tmp;
        i = p;
    }
}

typedef struct selector {
    cn_candidate *heap;
    int size, capacity;
} selector;

/* Offer one cell whose raw probability is `value`; the peak test runs only when it could enter. */
static void offer(selector *s, const view *v, int logits, int radius, int b, int c, int y, int x, float value)
{
    cn_candidate cand;
    float screen = value > 0.0f ? value : 0.0f;  /* a non-peak scores 0: the candidate's upper bound */
    /* Cells arrive in (class, position) order, so an equal score loses to what the heap holds. */
    if (s->size == s->capacity && screen <= s->heap[0].value) return;
    cand.value = is_peak(v, logits, radius, b, c, y, x, value) ? value : 0.0f;
    cand.class_id = c;
    cand.position = (uint32_t)y * (uint32_t)v->width + (uint32_t)x;
    if (s->size < s->capacity) {
        s->heap[s->size] = cand;
        sift_up(s->heap, s->size);
        s->size++;
    } else if (worse(&s->heap[0], &cand)) {
        s->heap[0] = cand;
        sift_down(s->heap, s->size, 0);
    }
}

static void select_image(selector *s, const view *v, int logits, int radius, int b)
{
    int c, y, x;
    if (v->t->dtype == CN_DTYPE_FLOAT32 && !logits) {
        /* Fast path: most cells fall below the heap's worst score and cost one load and one compare. */
        const float *data = (const float *)v->t->data + (size_t)b * v->item;
        int nhwc = v->t->layout == CN_LAYOUT_NHWC;
        for (c = 0; c < v->channels; ++c) {
            for (y = 0; y < v->height; ++y) {
                const float *row = nhwc ? data + (size_t)y * (size_t)v->width * (size_t)v->channels + (size_t)c
                                        : data + ((size_t)c * (size_t)v->height + (size_t)y) * (size_t)v->width;
                size_t step = nhwc ? (size_t)v->channels : 1u;
                for (x = 0; x < v->width; ++x) {
                    float value = row[(size_t)x * step];
                    float worst = s->heap[0].value;
                    if (s->size == s->capacity && worst >= 0.0f && value <= worst) continue;
                    if (value != value) value = -INFINITY;
                    offer(s, v, logits, radius, b, c, y, x, value);
                }
            }
        }
        return;
    }
    for (c = 0; c < v->channels; ++c)
        for (y = 0; y < v->height; ++y)
            for (x = 0; x < v->width; ++x) offer(s, v, logits, radius, b, c, y, x, heat_at(v, logits, b, c, y, x));
}

static cn_status check_tensor(const cn_tensor *t, int needed)
{
    if (!t->data) return needed ? CN_ERR_NULL_ARGUMENT : CN_OK;
    if (t->dtype < CN_DTYPE_FLOAT32 || t->dtype > CN_DTYPE_UINT8) return CN_ERR_INVALID_ARGUMENT;
    if (t->layout != CN_LAYOUT_NCHW && t->layout != CN_LAYOUT_NHWC) return CN_ERR_INVALID_ARGUMENT;
    if (t->dtype == CN_DTYPE_INT8 || t->dtype == CN_DTYPE_UINT8) {
        int lo = t->dtype == CN_DTYPE_INT8 ? -128 : 0;
        if (!(t->scale > 0.0f) || !isfinite(t->scale)) return CN_ERR_INVALID_ARGUMENT;
        if (t->zero_point < lo || t->zero_point > lo + 255) return CN_ERR_INVALID_ARGUMENT;
    }
    return CN_OK;
}

static view make_view(const cn_tensor *t, int channels, const cn_heads *h)
{
    view v;
    v.t = t;
    v.channels = channels;
    v.height = h->height;
    v.width = h->width;
    v.item = (size_t)channels * (size_t)h->height * (size_t)h->width;
    return v;
}

cn_status cn_postprocess(cn_context *context, const cn_heads *heads, const cn_transform *transforms,
                         float score_threshold, cn_detection *out, int capacity, int *counts)
{
    const cn_config *c;
    view heat, wh, reg;
    selector sel;
    cn_status st;
    int b, i, logits, radius;
    size_t cells;
    if (!context || !heads || !transforms || !out || !counts) return CN_ERR_NULL_ARGUMENT;
    c = &context->config;
    if (heads->batch <= 0 || heads->height <= 0 || heads->width <= 0) return CN_ERR_INVALID_ARGUMENT;
    if (heads->height > CN_MAX_IMAGE_SIDE || heads->width > CN_MAX_IMAGE_SIDE) return CN_ERR_INVALID_ARGUMENT;
    if (score_threshold != score_threshold) return CN_ERR_INVALID_ARGUMENT;
    if (capacity < c->k) return CN_ERR_BUFFER_TOO_SMALL;
    if ((st = check_tensor(&heads->heatmap, 1)) != CN_OK) return st;
    if ((st = check_tensor(&heads->wh, 1)) != CN_OK) return st;
    if ((st = check_tensor(&heads->reg, c->reg_offset)) != CN_OK) return st;
    for (b = 0; b < heads->batch; ++b) {
        const cn_transform *t = &transforms[b];
        if (t->output_width != heads->width || t->output_height != heads->height) return CN_ERR_SHAPE_MISMATCH;
        if (!isfinite(t->scale_x) || !isfinite(t->scale_y) || !isfinite(t->offset_x) || !isfinite(t->offset_y))
            return CN_ERR_INVALID_ARGUMENT;
    }
    heat = make_view(&heads->heatmap, c->num_classes, heads);
    wh = make_view(&heads->wh, 2, heads);
    reg = make_view(&heads->reg, 2, heads);
    logits = c->heatmap_activation == CN_HEATMAP_LOGITS;
    radius = c->peak_kernel / 2;
    cells = (size_t)heads->height * (size_t)heads->width;
    sel.heap = context->heap;
    sel.capacity = (size_t)c->k < cells * (size_t)c->num_classes ? c->k : (int)(cells * (size_t)c->num_classes);
    for (b = 0; b < heads->batch; ++b) {
        const cn_transform *t = &transforms[b];
        cn_detection *rows = out + (size_t)b * (size_t)capacity;
        int n, kept = 0;
        sel.size = 0;
        select_image(&sel, &heat, logits, radius, b);
        /* Heap sort: repeatedly move the worst to the end, leaving the best first. */
        for (n = sel.size; n > 1; --n) {
            cn_candidate tmp = sel.heap[0];
            sel.heap[0] = sel.heap[n - 1];
            sel.heap[n - 1] = tmp;
            sift_down(sel.heap, n - 1, 0);
        }
        for (i = 0; i < sel.size; ++i) {
            const cn_candidate *cand = &sel.heap[i];
            int y = (int)(cand->position / (uint32_t)heads->width), x = (int)(cand->position % (uint32_t)heads->width);
            float cx = (float)x, cy = (float)y, half_w, half_h;
            cn_detection *d;
            if (!(cand->value >= score_threshold)) break;
            if (c->reg_offset) {
                cx = cx + load(reg.t, offset_of(&reg, b, 0, y, x));
                cy = cy + load(reg.t, offset_of(&reg, b, 1, y, x));
            } else {
                cx = cx + 0.5f;
                cy = cy + 0.5f;
            }
            half_w = load(wh.t, offset_of(&wh, b, 0, y, x)) * 0.5f;
            half_h = load(wh.t, offset_of(&wh, b, 1, y, x)) * 0.5f;
            d = &rows[kept++];
            d->x1 = (cx - half_w) * t->scale_x + t->offset_x;
            d->y1 = (cy - half_h) * t->scale_y + t->offset_y;
            d->x2 = (cx + half_w) * t->scale_x + t->offset_x;
            d->y2 = (cy + half_h) * t->scale_y + t->offset_y;
            d->score = cand->value;
            d->class_id = cand->class_id;
        }
        counts[b] = kept;
    }
    return CN_OK;
}
