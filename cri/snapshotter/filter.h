/* containerd's filter syntax (its filters package), the language of List's `filters`:
 *
 *   selectors := selector ("," selector)*        every selector must match (AND)
 *   selector  := fieldpath [operator value]       no operator: the field is present
 *   fieldpath := field ("." field)*
 *   field     := quoted | [A-Za-z0-9_]+
 *   operator  := "==" | "!=" | "~="               ~= is a regular expression, unanchored
 *   value     := quoted | [^\s,]+
 *   quoted    := a Go string literal in "..." (and, for a ~= value, /.../ or |...|)
 *
 * Several expressions match when any of them does (OR); none, or an empty one, matches everything. Spaces, quoting
 * and escapes follow containerd's scanner exactly (`labels."a.b"==x`, `parent==""`). Regular expressions are POSIX
 * extended ones (glibc's, with its \w \s \b) where containerd uses Go's RE2; one that does not compile is
 * INVALID_ARGUMENT here where containerd would match nothing. */
#ifndef CRIMAGE_CRI_SNAPSHOTTER_FILTER_H
#define CRIMAGE_CRI_SNAPSHOTTER_FILTER_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"

typedef struct snap_filter snap_filter;

/* The value of the field at path (path[0] the top field), NULL when the object has no such field. */
typedef const char *(*snap_filter_field_fn)(void *userdata, char *const *path, size_t n_path);

/* Parses n expressions (each at most SNAP_MAX_FILTER bytes, at most SNAP_MAX_FILTERS of them); a syntax error is
 * INVALID_ARGUMENT with the expression and the offset. */
int snap_filter_parse(char *const *exprs, size_t n, snap_filter **ret, crimage_error **err);
bool snap_filter_match(const snap_filter *f, snap_filter_field_fn field, void *userdata);
void snap_filter_free(snap_filter *f);
static inline void snap_filter_freep(snap_filter **f) { snap_filter_free(*f); }
#define cleanup_snap_filter __attribute__((cleanup(snap_filter_freep)))

#endif
