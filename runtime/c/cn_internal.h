/* Internal layout of a context; not part of the API. */
#ifndef CN_INTERNAL_H
#define CN_INTERNAL_H

#include "centernet_edge.h"

/* One top-K candidate; ordered by value (desc), then class, then row-major position (asc). */
typedef struct cn_candidate {
    float value;
    int32_t class_id;
    uint32_t position;
} cn_candidate;

struct cn_context {
    cn_config config;
    float mul[3];            /* scale / std, network channel order */
    float add[3];            /* -mean / std */
    int owned;               /* 1 when cn_create allocated it */
    /* AFFINE warp tables (input_width columns, input_height rows): padded-source taps and fractions. */
    int32_t *col_first, *col_second;
    float *col_frac;
    int32_t *row_first, *row_second;
    float *row_frac;
    uint8_t *row_pixels;     /* one warped BGR row (3 * input_width) */
    cn_candidate *heap;      /* k entries */
};

#endif
