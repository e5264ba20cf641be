/* Output of the crimage command: human sizes, short IDs, aligned tables and crictl-shaped JSON. Pure functions,
 * kept apart from cli.c so unit tests can call them. */
#ifndef CRIMAGE_PLUGIN_CLI_FORMAT_H
#define CRIMAGE_PLUGIN_CLI_FORMAT_H

#include <json-c/json.h>
#include <stdint.h>
#include <stdio.h>

#include "crimage.h"

/* Length of an image ID in tables, as crictl prints it (without "sha256:"). */
#define CLI_SHORT_ID_LEN 13
#define CLI_NONE "<none>"

/* "772B", "773kB", "4.27MB": decimal units with three significant digits, as crictl prints sizes. buf of at
 * least 16 bytes. */
void cli_format_size(uint64_t bytes, char *buf, size_t len);
/* The ID without its "sha256:" prefix, cut to CLI_SHORT_ID_LEN characters; a new string. */
char *cli_short_id(const char *id);
/* Splits "host:5000/a/b:tag" into "host:5000/a/b" and "tag" (the tag follows the last ':' after the last '/');
 * without a tag, *ret_tag is "<none>". New strings. */
void cli_split_repo_tag(const char *repo_tag, char **ret_repo, char **ret_tag);
/* The repository of the first "name@digest" in repo_digests (or "<none>"); a new string. */
char *cli_repo_from_digests(char *const *repo_digests);
/* Copies s with control characters replaced by '?', so server-supplied text cannot drive the terminal. */
char *cli_printable(const char *s);

/* Column-aligned text table (IMAGE  TAG  IMAGE ID  SIZE), three spaces between columns. */
typedef struct cli_table cli_table;
cli_table *cli_table_new(size_t ncols, const char *const *headers);
void cli_table_add_row(cli_table *t, const char *const *cells);
/* Sorts the rows (not the header) by the first column, then the next, and so on. */
void cli_table_sort(cli_table *t);
void cli_table_print(const cli_table *t, FILE *f);
void cli_table_free(cli_table *t);

/* A CRI Image as crictl prints it with -o json: camelCase names, 64-bit numbers as strings, absent messages as
 * null. */
json_object *cli_image_to_json(const crimage_image *img);
/* {"status": {"imageFilesystems": [...], "containerFilesystems": []}} as crictl imagefsinfo prints it. */
json_object *cli_fs_usage_to_json(const crimage_fs_usage *usage, size_t n);
/* Pretty JSON text of o followed by a newline. */
void cli_json_print(json_object *o, FILE *f);

#endif
