/* containerd's filter syntax: a scanner and a recursive-descent parser written from the behaviour of containerd's
 * filters package (scanner.go, parser.go, quote.go), so the expressions containerd's metadata store sends a proxy
 * snapshotter (`labels."containerd.io/snapshot.ref"==sha256:...,parent=="k8s.io/4/..."`) mean the same here. */
#include <errno.h>
#include <regex.h>

#include "common/dynbuf.h"
#include "common/util.h"
#include "cri/snapshotter/filter.h"
#include "cri/snapshotter/internal.h"

typedef enum filter_op { OP_PRESENT, OP_EQUAL, OP_NOT_EQUAL, OP_MATCHES } filter_op;

typedef struct selector {
  char **path; /* NULL-terminated */
  size_t n_path;
  filter_op op;
  char *value;
  regex_t re; /* OP_MATCHES */
} selector;

typedef struct selector_list {
  selector *v;
  size_t n; /* 0: matches everything (the empty expression) */
} selector_list;

struct snap_filter {
  selector_list *v;
  size_t n; /* 0: matches everything */
};

/* ---- scanner ---- */

enum {
  TOK_EOF = -1,
  TOK_QUOTED = -2,
  TOK_VALUE = -3,
  TOK_FIELD = -4,
  TOK_SEPARATOR = -5,
  TOK_OPERATOR = -6,
  TOK_ILLEGAL = -7,
};

typedef struct scanner {
  const char *input;
  size_t len;
  size_t pos;  /* start of the current rune */
  size_t ppos; /* end of the current rune */
  bool value;  /* an operator was just read: what comes is a value */
  const char *err;
} scanner;

/* Decodes the rune at ppos; the input was checked to be UTF-8. */
static int32_t scan_next(scanner *s)
{
  if (s->ppos >= s->len) {
    s->pos = s->len;
    return TOK_EOF;
  }
  s->pos = s->ppos;
  const unsigned char *p = (const unsigned char *) s->input + s->ppos;
  int32_t r;
  size_t w;
  if (p[0] < 0x80) {
    r = p[0];
    w = 1;
  } else if ((p[0] & 0xe0) == 0xc0) {
    r = ((p[0] & 0x1f) << 6) | (p[1] & 0x3f);
    w = 2;
  } else if ((p[0] & 0xf0) == 0xe0) {
    r = ((p[0] & 0x0f) << 12) | ((p[1] & 0x3f) << 6) | (p[2] & 0x3f);
    w = 3;
  } else {
    r = ((p[0] & 0x07) << 18) | ((p[1] & 0x3f) << 12) | ((p[2] & 0x3f) << 6) | (p[3] & 0x3f);
    w = 4;
  }
  s->ppos += w;
  return r;
}

static int32_t scan_peek(scanner *s)
{
  size_t pos = s->pos, ppos = s->ppos;
  int32_t r = scan_next(s);
  s->pos = pos;
  s->ppos = ppos;
  return r;
}

static void scan_error(scanner *s, const char *msg)
{
  if (!s->err)
    s->err = msg;
}

/* Go's unicode.IsSpace. */
static bool is_space(int32_t r)
{
  switch (r) {
  case '\t':
  case '\n':
  case '\v':
  case '\f':
  case '\r':
  case ' ':
  case 0x85:
  case 0xa0:
  case 0x1680:
  case 0x2028:
  case 0x2029:
  case 0x202f:
  case 0x205f:
  case 0x3000:
    return true;
  default:
    return r >= 0x2000 && r <= 0x200a;
  }
}

static bool is_alpha(int32_t r) { return (r >= 'A' && r <= 'Z') || (r >= 'a' && r <= 'z'); }
static bool is_digit(int32_t r) { return r >= '0' && r <= '9'; }
static bool is_field_rune(int32_t r) { return r == '_' || is_alpha(r) || is_digit(r); }
static bool is_operator_rune(int32_t r) { return r == '=' || r == '!' || r == '~'; }
static bool is_quote_rune(int32_t r) { return r == '/' || r == '|' || r == '"'; }
static bool is_separator_rune(int32_t r) { return r == ',' || r == '.'; }
/* Go's test (letter, digit, number, graphic or punctuation, not a comma, not a space): for ASCII the printable
 * characters; beyond it, everything but the spaces and the C0/C1 controls. */
static bool is_value_rune(int32_t r)
{
  if (r < 0 || r == ',' || is_space(r))
    return false;
  if (r < 0x80)
    return r > 0x20 && r < 0x7f;
  return r >= 0xa0;
}

static int hex_value(int32_t r)
{
  if (r >= '0' && r <= '9')
    return r - '0';
  if (r >= 'a' && r <= 'f')
    return r - 'a' + 10;
  if (r >= 'A' && r <= 'F')
    return r - 'A' + 10;
  return 16;
}

/* n digits of base, the first one ch; returns the rune after them. */
static int32_t scan_digits(scanner *s, int32_t ch, int base, int n, bool *legal)
{
  while (n > 0 && ch >= 0 && hex_value(ch) < base) {
    ch = scan_next(s);
    n--;
  }
  if (n > 0) {
    scan_error(s, "illegal numeric escape sequence");
    *legal = false;
  } else {
    *legal = true;
  }
  return ch;
}

static int32_t scan_escape(scanner *s, int32_t quote, bool *legal)
{
  int32_t ch = scan_next(s);
  switch (ch) {
  case 'a':
  case 'b':
  case 'f':
  case 'n':
  case 'r':
  case 't':
  case 'v':
  case '\\':
    *legal = true;
    return scan_next(s);
  case '0':
  case '1':
  case '2':
  case '3':
  case '4':
  case '5':
  case '6':
  case '7':
    return scan_digits(s, ch, 8, 3, legal);
  case 'x':
    return scan_digits(s, scan_next(s), 16, 2, legal);
  case 'u':
    return scan_digits(s, scan_next(s), 16, 4, legal);
  case 'U':
    return scan_digits(s, scan_next(s), 16, 8, legal);
  default:
    if (ch == quote) {
      *legal = true;
      return scan_next(s);
    }
    scan_error(s, "illegal escape sequence");
    *legal = false;
    return ch;
  }
}

static bool scan_quoted(scanner *s, int32_t quote)
{
  bool illegal = false;
  int32_t ch = scan_next(s);
  while (ch != quote) {
    if (ch == '\n' || ch < 0) {
      scan_error(s, "quoted literal not terminated");
      return false;
    }
    if (ch == '\\') {
      bool legal;
      ch = scan_escape(s, quote, &legal);
      if (!legal)
        illegal = true;
    } else {
      ch = scan_next(s);
    }
  }
  return !illegal;
}

/* The next token: its kind (a TOK_ value, or the rune itself for anything else), where it starts, and its text
 * (input[*start, s->ppos)). */
static int32_t scan(scanner *s, size_t *start)
{
  int32_t ch = scan_next(s);
  for (;;) {
    *start = s->pos;
    if (ch == TOK_EOF)
      return TOK_EOF;
    if (is_quote_rune(ch))
      return scan_quoted(s, ch) ? TOK_QUOTED : TOK_ILLEGAL;
    if (is_separator_rune(ch)) {
      s->value = false;
      return TOK_SEPARATOR;
    }
    if (is_operator_rune(ch)) {
      while (is_operator_rune(scan_peek(s)))
        scan_next(s);
      s->value = true;
      return TOK_OPERATOR;
    }
    if (is_space(ch)) {
      ch = scan_next(s);
      continue;
    }
    if (s->value) {
      while (is_value_rune(scan_peek(s)))
        scan_next(s);
      s->value = false;
      return TOK_VALUE;
    }
    if (is_field_rune(ch)) {
      while (is_field_rune(scan_peek(s)))
        scan_next(s);
      return TOK_FIELD;
    }
    return ch;
  }
}

/* ---- parser ---- */

typedef struct parser {
  scanner sc;
  crimage_error **err;
} parser;

static int parse_error(parser *p, size_t pos, const char *msg)
{
  return crimage_error_set(p->err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "filters: parse error at offset %zu of `%s`: %s",
                           pos, p->sc.input, msg);
}

static void append_rune(dynbuf *b, uint32_t r)
{
  char u[4];
  size_t n;
  if (r >= 0xd800 && r <= 0xdfff)
    r = 0xfffd; /* Go encodes a lone surrogate as the replacement character */
  if (r < 0x80) {
    u[0] = (char) r;
    n = 1;
  } else if (r < 0x800) {
    u[0] = (char) (0xc0 | (r >> 6));
    u[1] = (char) (0x80 | (r & 0x3f));
    n = 2;
  } else if (r < 0x10000) {
    u[0] = (char) (0xe0 | (r >> 12));
    u[1] = (char) (0x80 | ((r >> 6) & 0x3f));
    u[2] = (char) (0x80 | (r & 0x3f));
    n = 3;
  } else {
    u[0] = (char) (0xf0 | (r >> 18));
    u[1] = (char) (0x80 | ((r >> 12) & 0x3f));
    u[2] = (char) (0x80 | ((r >> 6) & 0x3f));
    u[3] = (char) (0x80 | (r & 0x3f));
    n = 4;
  }
  dynbuf_append(b, u, n);
}

/* The text of a quoted token (delimiters included) with its escapes decoded; NULL (error set) when invalid. The
 * scanner already checked the escapes' shape; what is left is what Go's strconv checks on top (octal past 255,
 * runes past U+10FFFF) and what a C string cannot hold (NUL). */
static char *unquote(parser *p, size_t pos, const char *s, size_t len, bool allow_alternatives)
{
  if (!allow_alternatives && s[0] != '"') {
    parse_error(p, pos, "invalid quote encountered");
    return NULL;
  }
  char quote = s[0];
  cleanup_dynbuf dynbuf b;
  dynbuf_init(&b, len + 1);
  for (size_t i = 1; i + 1 < len;) {
    unsigned char c = (unsigned char) s[i];
    if (c != '\\') {
      dynbuf_append(&b, &s[i], 1);
      i++;
      continue;
    }
    char e = s[i + 1];
    i += 2;
    uint32_t v = 0;
    int n = 0;
    switch (e) {
    case 'a': v = '\a'; break;
    case 'b': v = '\b'; break;
    case 'f': v = '\f'; break;
    case 'n': v = '\n'; break;
    case 'r': v = '\r'; break;
    case 't': v = '\t'; break;
    case 'v': v = '\v'; break;
    case '\\': v = '\\'; break;
    case 'x': n = 2; break;
    case 'u': n = 4; break;
    case 'U': n = 8; break;
    default:
      if (e >= '0' && e <= '7') {
        v = (uint32_t) (e - '0');
        for (int j = 0; j < 2; j++)
          v = (v << 3) | (uint32_t) (s[i++] - '0');
        if (v > 255) {
          parse_error(p, pos, "unquoting failed: octal escape past \\377");
          return NULL;
        }
        /* A single byte, as in Go (possibly not UTF-8 on its own). */
        unsigned char byte = (unsigned char) v;
        if (byte == 0) {
          parse_error(p, pos, "unquoting failed: NUL is not allowed");
          return NULL;
        }
        dynbuf_append(&b, &byte, 1);
        continue;
      }
      if (e != quote) {
        parse_error(p, pos, "unquoting failed: quote syntax error");
        return NULL;
      }
      v = (uint32_t) quote;
      break;
    }
    if (n > 0) {
      for (int j = 0; j < n; j++)
        v = (v << 4) | (uint32_t) hex_value(s[i++]);
      if (e == 'x') {
        unsigned char byte = (unsigned char) v;
        if (byte == 0) {
          parse_error(p, pos, "unquoting failed: NUL is not allowed");
          return NULL;
        }
        dynbuf_append(&b, &byte, 1);
        continue;
      }
      if (v > 0x10ffff) {
        parse_error(p, pos, "unquoting failed: quote syntax error");
        return NULL;
      }
    }
    if (v == 0) {
      parse_error(p, pos, "unquoting failed: NUL is not allowed");
      return NULL;
    }
    append_rune(&b, v);
  }
  return dynbuf_take(&b, NULL);
}

static char *token_text(parser *p, size_t start) { return xstrndup(p->sc.input + start, p->sc.ppos - start); }

static char *parse_field(parser *p)
{
  size_t start;
  int32_t tok = scan(&p->sc, &start);
  switch (tok) {
  case TOK_FIELD:
    return token_text(p, start);
  case TOK_QUOTED:
    return unquote(p, start, p->sc.input + start, p->sc.ppos - start, false);
  case TOK_ILLEGAL:
    parse_error(p, start, p->sc.err ? p->sc.err : "illegal token");
    return NULL;
  default:
    parse_error(p, start, "expected field or quoted");
    return NULL;
  }
}

static void selector_clear(selector *sel)
{
  strv_free(sel->path);
  free(sel->value);
  if (sel->op == OP_MATCHES)
    regfree(&sel->re);
}

static int parse_selector(parser *p, selector *sel)
{
  *sel = (selector){.op = OP_PRESENT};
  char *f = parse_field(p);
  if (!f)
    return -EINVAL;
  sel->path = xcalloc(2, sizeof(*sel->path));
  sel->path[sel->n_path++] = f;
  while (scan_peek(&p->sc) == '.') {
    size_t start;
    scan(&p->sc, &start); /* the separator */
    f = parse_field(p);
    if (!f)
      return -EINVAL;
    sel->path = xrealloc(sel->path, (sel->n_path + 2) * sizeof(*sel->path));
    sel->path[sel->n_path++] = f;
    sel->path[sel->n_path] = NULL;
  }

  int32_t next = scan_peek(&p->sc);
  if (next == ',' || next == TOK_EOF)
    return 0;

  size_t start;
  int32_t tok = scan(&p->sc, &start);
  if (tok == TOK_ILLEGAL)
    return parse_error(p, start, p->sc.err ? p->sc.err : "illegal token");
  if (tok != TOK_OPERATOR)
    return parse_error(p, start, "expected an operator (\"==\"|\"!=\"|\"~=\")");
  size_t oplen = p->sc.ppos - start;
  const char *op = p->sc.input + start;
  filter_op o;
  if (oplen == 2 && strncmp(op, "==", 2) == 0)
    o = OP_EQUAL;
  else if (oplen == 2 && strncmp(op, "!=", 2) == 0)
    o = OP_NOT_EQUAL;
  else if (oplen == 2 && strncmp(op, "~=", 2) == 0)
    o = OP_MATCHES;
  else
    return parse_error(p, start, "unsupported operator");

  tok = scan(&p->sc, &start);
  switch (tok) {
  case TOK_VALUE:
  case TOK_FIELD:
    sel->value = token_text(p, start);
    break;
  case TOK_QUOTED:
    sel->value = unquote(p, start, p->sc.input + start, p->sc.ppos - start, o == OP_MATCHES);
    if (!sel->value)
      return -EINVAL;
    break;
  case TOK_ILLEGAL:
    return parse_error(p, start, p->sc.err ? p->sc.err : "illegal token");
  default:
    return parse_error(p, start, "expected value or quoted");
  }
  if (o == OP_MATCHES) {
    int r = regcomp(&sel->re, sel->value, REG_EXTENDED | REG_NOSUB);
    if (r != 0) {
      char msg[128];
      regerror(r, &sel->re, msg, sizeof(msg));
      cleanup_free char *text = xasprintf("invalid regular expression: %s", msg);
      return parse_error(p, start, text);
    }
  }
  sel->op = o;
  return 0;
}

static void list_clear(selector_list *l)
{
  for (size_t i = 0; i < l->n; i++)
    selector_clear(&l->v[i]);
  free(l->v);
  *l = (selector_list){0};
}

static int parse_expression(const char *expr, selector_list *ret, crimage_error **err)
{
  *ret = (selector_list){0};
  if (!*expr)
    return 0;
  parser p = {.sc = {.input = expr, .len = strlen(expr)}, .err = err};
  for (;;) {
    ret->v = xrealloc(ret->v, (ret->n + 1) * sizeof(*ret->v));
    int r = parse_selector(&p, &ret->v[ret->n]);
    ret->n++; /* cleared below whatever happened */
    if (r < 0) {
      list_clear(ret);
      return r;
    }
    int32_t next = scan_peek(&p.sc);
    if (next == TOK_EOF)
      return 0;
    size_t start;
    if (next != ',') {
      scan_next(&p.sc);
      list_clear(ret);
      return parse_error(&p, p.sc.pos, "unexpected input");
    }
    scan(&p.sc, &start); /* the comma */
  }
}

int snap_filter_parse(char *const *exprs, size_t n, snap_filter **ret, crimage_error **err)
{
  if (n > SNAP_MAX_FILTERS)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "%zu filters, more than %d", n, SNAP_MAX_FILTERS);
  for (size_t i = 0; i < n; i++) {
    size_t len = strlen(exprs[i]);
    if (len > SNAP_MAX_FILTER)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "filter #%zu is %zu bytes long, more than %d",
                               i + 1, len, SNAP_MAX_FILTER);
    if (!snap_utf8_valid(exprs[i]))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EILSEQ, "filter #%zu is not valid UTF-8", i + 1);
  }
  snap_filter *f = xcalloc(1, sizeof(*f));
  if (n > 0)
    f->v = xcalloc(n, sizeof(*f->v));
  for (size_t i = 0; i < n; i++) {
    int r = parse_expression(exprs[i], &f->v[i], err);
    if (r < 0) {
      snap_filter_free(f);
      return r;
    }
    f->n++;
  }
  *ret = f;
  return 0;
}

void snap_filter_free(snap_filter *f)
{
  if (!f)
    return;
  for (size_t i = 0; i < f->n; i++)
    list_clear(&f->v[i]);
  free(f->v);
  free(f);
}

static bool selector_match(const selector *sel, snap_filter_field_fn field, void *userdata)
{
  const char *value = field(userdata, sel->path, sel->n_path);
  switch (sel->op) {
  case OP_PRESENT:
    return value != NULL;
  case OP_EQUAL:
    return value && streq(value, sel->value);
  case OP_NOT_EQUAL:
    return !streq(value ? value : "", sel->value);
  case OP_MATCHES:
    return regexec(&sel->re, value ? value : "", 0, NULL, 0) == 0;
  }
  return false;
}

bool snap_filter_match(const snap_filter *f, snap_filter_field_fn field, void *userdata)
{
  if (!f || f->n == 0)
    return true;
  for (size_t i = 0; i < f->n; i++) {
    const selector_list *l = &f->v[i];
    bool all = true;
    for (size_t j = 0; j < l->n && all; j++)
      all = selector_match(&l->v[j], field, userdata);
    if (all)
      return true;
  }
  return false;
}
