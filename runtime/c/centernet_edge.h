/*
 * centernet_edge: CenterNet pre- and post-processing for embedded targets (C99, libc + libm only).
 *
 * The third rendering of the toolkit's model spec, next to the numpy reference (runtime/) and the
 * exported ONNX graph (export/graph.py); tests hold all three to the same numbers.
 *
 *   image --cn_preprocess--> network input --(your runtime: TensorRT, ONNX Runtime, NPU SDK)-->
 *   heatmap / wh / reg heads --cn_postprocess--> detections in original-image pixels
 *
 * Memory: cn_create() allocates once (cn_context_size() bytes); cn_context_init() places a context in
 * caller memory instead (no malloc at all). cn_preprocess() and cn_postprocess() never allocate.
 * Ownership: every buffer passed in stays the caller's; the library keeps no pointer after a call returns.
 * Threads: no global state. A context holds per-call scratch, so one context must not be used by two
 * threads at once; use one context per thread (they are cheap), or serialise the calls.
 * Errors: every function checks its arguments and returns a cn_status; none aborts or exits.
 */
#ifndef CENTERNET_EDGE_H
#define CENTERNET_EDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a struct layout, enum value or function signature changes. */
#define CN_ABI_VERSION 1
#define CN_VERSION_MAJOR 1
#define CN_VERSION_MINOR 0
#define CN_VERSION_PATCH 0

/* Largest image side accepted (keeps every size computation far from integer overflow). */
#define CN_MAX_IMAGE_SIDE 32768
/* TensorRT's TopK limit, which the exported graphs share. */
#define CN_MAX_K 3839

typedef enum cn_status {
    CN_OK = 0,
    CN_ERR_NULL_ARGUMENT = 1,     /* a required pointer was NULL */
    CN_ERR_INVALID_ARGUMENT = 2,  /* a value out of range: size, stride, enum, scale, ... */
    CN_ERR_BAD_CONFIG = 3,        /* the cn_config is inconsistent or from another ABI */
    CN_ERR_UNSUPPORTED = 4,       /* valid, but not implemented here (e.g. the 'stretch' pre-process) */
    CN_ERR_BUFFER_TOO_SMALL = 5,  /* an output buffer or the context memory is too small */
    CN_ERR_SHAPE_MISMATCH = 6     /* head tensors disagree with the config or the transform */
} cn_status;

typedef enum cn_pixel_format {
    CN_PIXEL_BGR = 0,   /* 3 bytes per pixel, as OpenCV stores images */
    CN_PIXEL_RGB = 1,
    CN_PIXEL_BGRA = 2,  /* 4 bytes per pixel, alpha ignored */
    CN_PIXEL_GRAY = 3   /* 1 byte per pixel, replicated to the three channels */
} cn_pixel_format;

typedef enum cn_resize {
    CN_RESIZE_AFFINE = 0,    /* official fixed-size warp: centre (w/2, h/2), side max(h, w) */
    CN_RESIZE_KEEP_RES = 1,  /* pad to ((h|pad)+1, (w|pad)+1), image centred, no scaling */
    CN_RESIZE_STRETCH = 2    /* plain resize (foreign models): post-process only */
} cn_resize;

typedef enum cn_color { CN_COLOR_BGR = 0, CN_COLOR_RGB = 1 } cn_color;
typedef enum cn_topk { CN_TOPK_TWO_STAGE = 0, CN_TOPK_SINGLE = 1 } cn_topk;
typedef enum cn_activation { CN_HEATMAP_LOGITS = 0, CN_HEATMAP_SIGMOID = 1 } cn_activation;
typedef enum cn_back_projection { CN_BACK_AFFINE_INVERSE = 0, CN_BACK_BORDER_SHIFT = 1 } cn_back_projection;

/* The model spec as C values; centernet_model_config.h of a bundle fills one (CN_MODEL_CONFIG_INIT). */
typedef struct cn_config {
    int abi_version;          /* CN_ABI_VERSION */
    int resize;               /* cn_resize */
    int input_height;         /* network input for AFFINE / STRETCH; ignored for KEEP_RES */
    int input_width;
    int pad;                  /* KEEP_RES: 2**k - 1 (31) */
    int color;                /* cn_color: channel order the network expects */
    double scale;             /* multiplies 0..255 pixels before (x - mean) / std */
    double mean[3];           /* in network channel order */
    double std[3];
    int num_classes;
    int stride;               /* output stride of the heads (4) */
    int k;                    /* detections per image (top-K), 1..CN_MAX_K */
    int topk;                 /* cn_topk */
    int peak_kernel;          /* odd, 3 */
    int heatmap_activation;   /* cn_activation of the heatmap the network outputs */
    int reg_offset;           /* 1: add the reg head to the centre; 0: add 0.5 */
    int back_projection;      /* cn_back_projection */
} cn_config;

typedef struct cn_context cn_context;

/* Where an image lands in the network and the way back: original = head_coordinate * scale + offset. */
typedef struct cn_transform {
    int image_width, image_height;
    int input_width, input_height;     /* network input */
    int output_width, output_height;   /* heads: input / stride (floor) */
    float scale_x, scale_y;
    float offset_x, offset_y;
} cn_transform;

typedef struct cn_image {
    const uint8_t *data;
    int width, height;
    size_t stride_bytes;  /* bytes from one row to the next; >= width * bytes per pixel */
    int format;           /* cn_pixel_format */
} cn_image;

typedef enum cn_tensor_type {
    CN_TENSOR_FLOAT32_NCHW = 0,    /* normalised float [3, H, W] */
    CN_TENSOR_INT8_NCHW = 1,       /* normalised, quantised: saturate(round_half_even(x / scale) + zero_point) */
    CN_TENSOR_UINT8_NCHW = 2,
    CN_TENSOR_UINT8_NHWC_BGR = 3   /* the warped uint8 BGR image, not normalised ('normalize' graphs) */
} cn_tensor_type;

typedef enum cn_dtype { CN_DTYPE_FLOAT32 = 0, CN_DTYPE_FLOAT16 = 1, CN_DTYPE_INT8 = 2, CN_DTYPE_UINT8 = 3 } cn_dtype;
typedef enum cn_layout { CN_LAYOUT_NCHW = 0, CN_LAYOUT_NHWC = 1 } cn_layout;

/* One head tensor [batch, channels, height, width] (NCHW) or [batch, height, width, channels] (NHWC).
 * Integer tensors are read as (q - zero_point) * scale; float tensors ignore scale and zero_point. */
typedef struct cn_tensor {
    const void *data;
    int dtype;            /* cn_dtype */
    int layout;           /* cn_layout */
    float scale;
    int zero_point;
} cn_tensor;

typedef struct cn_heads {
    cn_tensor heatmap;    /* num_classes channels */
    cn_tensor wh;         /* 2 channels: width, height in output cells */
    cn_tensor reg;        /* 2 channels: centre offset; data may be NULL when the config has no reg_offset */
    int batch;
    int height, width;    /* spatial size of the heads */
} cn_heads;

typedef struct cn_detection {
    float x1, y1, x2, y2;  /* original-image pixels, not clipped */
    float score;
    int class_id;          /* 0-based */
} cn_detection;

/* "major.minor.patch"; static storage. */
const char *cn_version(void);
int cn_abi_version(void);
/* A constant English sentence for any value (unknown values included). */
const char *cn_status_string(cn_status status);

/* Fill *config with the official 512x512 COCO defaults (callers then change what differs). */
cn_status cn_config_default(cn_config *config);
cn_status cn_config_check(const cn_config *config);

/* Bytes a context needs for this config (0 when the config is invalid). */
size_t cn_context_size(const cn_config *config);
/* Build a context in caller memory (aligned to 16 bytes, cn_context_size() bytes); no allocation. */
cn_status cn_context_init(void *memory, size_t size, const cn_config *config, cn_context **out);
/* Allocate (once, with malloc) and build a context; release it with cn_destroy(). */
cn_status cn_create(const cn_config *config, cn_context **out);
void cn_destroy(cn_context *context);  /* only for contexts from cn_create; NULL is ignored */
const cn_config *cn_context_config(const cn_context *context);

/* The transform of an image of this size (what cn_preprocess also returns). */
cn_status cn_transform_for_image(const cn_context *context, int image_width, int image_height,
                                 cn_transform *out);
/* Bytes cn_preprocess writes for one image of this size and tensor type. */
cn_status cn_input_bytes(const cn_context *context, int image_width, int image_height, int tensor_type,
                         size_t *bytes);

/* One image -> the network input of one batch item. quant_scale / quant_zero_point are used by the
 * INT8/UINT8 NCHW types only. transform may be NULL. */
cn_status cn_preprocess(cn_context *context, const cn_image *image, int tensor_type, float quant_scale,
                        int quant_zero_point, void *out, size_t out_bytes, cn_transform *transform);

/* Heads of a batch -> detections, best first: peak NMS, top-K, decode, back-projection.
 * transforms: one per batch item. out: batch * capacity rows (item b starts at out + b * capacity),
 * capacity >= config k. counts[b] gets the rows written for item b (rows with score >= score_threshold;
 * pass -INFINITY to keep all K, as the exported graph does). Ties break by lower class, then lower
 * row-major position, exactly as the exported graph's TopK. */
cn_status cn_postprocess(cn_context *context, const cn_heads *heads, const cn_transform *transforms,
                         float score_threshold, cn_detection *out, int capacity, int *counts);

#ifdef __cplusplus
}
#endif
#endif /* CENTERNET_EDGE_H */
