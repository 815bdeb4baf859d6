# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=False
"""The compiled twins of ``ringread``'s ``EntityEntriesPython``, ``read_column_python`` and
``quantile_bin_python``: same arguments, same answers.

Where Python unpacks every entity's msgpack map into a dict of bytes, ``EntityEntries`` walks
the maps in place once and keeps where each asked-for entry lies in the reply. The readers then
take the header and the slot straight out of those bytes (little-endian doubles and int64s, as
``ring`` writes them; for ``last``, walking its msgpack array to the one slot asked for) and fill
each value tuple in place, where Python pays for ``struct`` and msgpack calls, their tuples and
lists, and an argument tuple per value.

A ``last`` slot this walk does not read itself (an ext type, a nested value, text that is not
UTF-8) is handed to ``ringread.last_value``. The walk stops at the slot where msgpack reads the
whole array, so only an entry broken after that slot (eventpulse never writes one) can read
differently. Keep the twins in step: the tests compare them on random entries.
``cdivision=False`` keeps Python's floor division for the ring position, which can be negative.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_CheckExact
from cpython.list cimport PyList_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

cdef extern from *:
    """
    /* A tuple subclass without extra fields, allocated the way tuple.__new__ does it. */
    static PyObject *ep_alloc_value(PyObject *type, Py_ssize_t n) {
        return ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, n);
    }
    #if PY_LITTLE_ENDIAN
    #define EP_LITTLE_ENDIAN 1
    #else
    #define EP_LITTLE_ENDIAN 0
    #endif
    """
    object ep_alloc_value(object type, Py_ssize_t n)
    bint EP_LITTLE_ENDIAN
    void PyObject_GC_UnTrack(object o)

cdef int64_t TIME_LIMIT = 1LL << 53  # ringread.TIME_LIMIT
cdef str LAST_ESCAPE = "\x00ep-json:"  # ring.LAST_ESCAPE
cdef double COUNT_LIMIT = <double>(1LL << 53)  # ringread.COUNT_LIMIT

cdef enum:
    RING_AT = 33  # kinds.HEADER_SIZE
    WHEN_AT = 9  # kinds.WHEN_AT: newest, then head
    FIELDS = 7  # value, window start, window end, newest event, age, status, event count
    NO_ENTRY = -1

cdef enum:  # kinds.READ_* (checked by tests/test_kinds.py against the table)
    COUNT = 0
    SUM = 1
    AVERAGE = 2
    EXTREME = 3
    LAST = 4

cdef str STALE = "stale"


# --- bytes -----------------------------------------------------------------------------------

cdef inline int64_t _int64(const unsigned char *p) noexcept:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline double _double(const unsigned char *p) noexcept:
    cdef double v
    memcpy(&v, p, 8)
    return v


cdef inline uint64_t _big(const unsigned char *p, int n) noexcept:
    """An n-byte big-endian unsigned integer (msgpack's lengths and numbers)."""
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


# --- msgpack scalars -------------------------------------------------------------------------

cdef enum Element:
    ELEMENT_OTHER  # anything this walk leaves to msgpack: containers, ext types, 0xc1
    ELEMENT_NIL
    ELEMENT_FALSE
    ELEMENT_TRUE
    ELEMENT_INT
    ELEMENT_UINT
    ELEMENT_FLOAT
    ELEMENT_STR
    ELEMENT_BIN


cdef struct Scalar:
    Element kind
    int64_t i  # ELEMENT_INT
    uint64_t u  # ELEMENT_UINT
    double f  # ELEMENT_FLOAT
    const unsigned char *data  # ELEMENT_STR, ELEMENT_BIN
    Py_ssize_t size


cdef const unsigned char *_scalar_at(const unsigned char *p, const unsigned char *end,
                                     Scalar *out) noexcept:
    """Read the msgpack scalar at p into out and return where the next element starts; NULL
    if the buffer ends first or the element is not a scalar (out.kind is then ELEMENT_OTHER)."""
    cdef unsigned char b
    cdef Py_ssize_t n, head
    cdef float f32
    cdef uint32_t bits32
    cdef uint64_t bits64
    out.kind = ELEMENT_OTHER
    if p >= end:
        return NULL
    b = p[0]
    if b <= 0x7f:
        out.kind, out.u = ELEMENT_UINT, b
        return p + 1
    if b >= 0xe0:
        out.kind, out.i = ELEMENT_INT, <int8_t>b
        return p + 1
    if b == 0xc0 or b == 0xc2 or b == 0xc3:
        out.kind = ELEMENT_NIL if b == 0xc0 else (ELEMENT_FALSE if b == 0xc2 else ELEMENT_TRUE)
        return p + 1
    if 0xa0 <= b <= 0xbf:  # fixstr
        out.kind, head, n = ELEMENT_STR, 1, b & 0x1f
    elif 0xc4 <= b <= 0xc6 or 0xd9 <= b <= 0xdb:  # bin 8/16/32, str 8/16/32
        head = 1 + (1 << (b - (0xc4 if b <= 0xc6 else 0xd9)))
        if end - p < head:
            return NULL
        out.kind = ELEMENT_BIN if b <= 0xc6 else ELEMENT_STR
        n = <Py_ssize_t>_big(p + 1, <int>head - 1)
    elif 0xcc <= b <= 0xd3:  # uint and int 8/16/32/64
        head = 1 + (1 << ((b - 0xcc) & 3))
        if end - p < head:
            return NULL
        bits64 = _big(p + 1, <int>head - 1)
        if b <= 0xcf:
            out.kind, out.u = ELEMENT_UINT, bits64
        else:
            out.kind = ELEMENT_INT
            out.i = (<int8_t>bits64 if head == 2 else <int16_t>bits64 if head == 3
                     else <int32_t>bits64 if head == 5 else <int64_t>bits64)
        return p + head
    elif b == 0xca or b == 0xcb:  # float 32/64
        head = 5 if b == 0xca else 9
        if end - p < head:
            return NULL
        if b == 0xca:
            bits32 = <uint32_t>_big(p + 1, 4)
            memcpy(&f32, &bits32, 4)
            out.f = f32
        else:
            bits64 = _big(p + 1, 8)
            memcpy(&out.f, &bits64, 8)
        out.kind = ELEMENT_FLOAT
        return p + head
    else:
        return NULL
    if n < 0 or n > end - p - head:
        out.kind = ELEMENT_OTHER
        return NULL
    out.data, out.size = p + head, n
    return p + head + n


cdef object _scalar_object(const Scalar *s):
    """The object msgpack.unpackb (raw=False) makes of a scalar; UnicodeDecodeError as it."""
    if s.kind == ELEMENT_NIL:
        return None
    if s.kind == ELEMENT_FALSE:
        return False
    if s.kind == ELEMENT_TRUE:
        return True
    if s.kind == ELEMENT_INT:
        return s.i
    if s.kind == ELEMENT_UINT:
        return s.u
    if s.kind == ELEMENT_FLOAT:
        return s.f
    if s.kind == ELEMENT_STR:
        return PyUnicode_DecodeUTF8(<const char *>s.data, s.size, NULL)
    return (<const char *>s.data)[:s.size]


cdef int _truth(const Scalar *s) noexcept:
    """A scalar's truth as Python sees it; -1 for what _scalar_at does not read."""
    if s.kind == ELEMENT_NIL or s.kind == ELEMENT_FALSE:
        return 0
    if s.kind == ELEMENT_TRUE:
        return 1
    if s.kind == ELEMENT_INT:
        return s.i != 0
    if s.kind == ELEMENT_UINT:
        return s.u != 0
    if s.kind == ELEMENT_FLOAT:
        return s.f != 0.0
    if s.kind == ELEMENT_STR or s.kind == ELEMENT_BIN:
        return s.size != 0
    return -1


cdef const unsigned char *_container(const unsigned char *p, const unsigned char *end,
                                     unsigned char fix, unsigned char sixteen,
                                     uint64_t *length) noexcept:
    """The length of the map (fix=0x80, sixteen=0xde) or array (0x90, 0xdc) at p; where its
    first element starts, or NULL if p holds something else."""
    if p >= end:
        return NULL
    cdef unsigned char b = p[0]
    if fix <= b <= fix + 0x0f:
        length[0] = b & 0x0f
        return p + 1
    if b == sixteen and end - p >= 3:
        length[0] = _big(p + 1, 2)
        return p + 3
    if b == sixteen + 1 and end - p >= 5:
        length[0] = _big(p + 1, 4)
        return p + 5
    return NULL


# --- entries ---------------------------------------------------------------------------------

cdef class EntityEntries:
    """Where each asked-for feature's entry lies in each entity's MGET reply.

    A reply counts only if it is a msgpack map of strings to strings or binaries and nothing
    after it (what eventpulse writes); any other reply reads as an entity without features, as
    in the Python twin. A key written twice counts once, its last value, as msgpack has it.
    """

    cdef readonly tuple raws
    cdef readonly tuple keys
    cdef Py_ssize_t n, m
    cdef Py_ssize_t *offsets  # n x m: where the entry starts in raws[i], or NO_ENTRY
    cdef Py_ssize_t *sizes

    def __cinit__(self, raws, keys):
        self.raws = tuple(raws)
        self.keys = tuple(keys)
        self.n, self.m = len(self.raws), len(self.keys)
        for key in self.keys:
            if not PyBytes_CheckExact(key):
                raise TypeError("feature keys must be bytes")
        cdef Py_ssize_t cells = self.n * self.m, i
        self.offsets = <Py_ssize_t *>PyMem_Malloc(max(cells, 1) * sizeof(Py_ssize_t))
        self.sizes = <Py_ssize_t *>PyMem_Malloc(max(cells, 1) * sizeof(Py_ssize_t))
        if self.offsets is NULL or self.sizes is NULL:
            raise MemoryError()
        for i in range(self.n):
            self._index(i)

    def __dealloc__(self):
        PyMem_Free(self.offsets)
        PyMem_Free(self.sizes)

    cdef void _index(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t k, row = i * self.m
        cdef object raw = self.raws[i]
        for k in range(self.m):
            self.offsets[row + k] = NO_ENTRY
        if raw is None or not PyBytes_CheckExact(raw):
            return
        cdef const unsigned char *start = <const unsigned char *>PyBytes_AS_STRING(raw)
        cdef const unsigned char *end = start + PyBytes_GET_SIZE(raw)
        cdef const unsigned char *p
        cdef uint64_t pairs, pair
        cdef Scalar key, value
        cdef bytes wanted
        p = _container(start, end, 0x80, 0xde, &pairs)
        if p is NULL:
            return
        for pair in range(pairs):
            p = _scalar_at(p, end, &key)
            if p is NULL or (key.kind != ELEMENT_STR and key.kind != ELEMENT_BIN):
                break
            p = _scalar_at(p, end, &value)
            if p is NULL or (value.kind != ELEMENT_STR and value.kind != ELEMENT_BIN):
                break
            for k in range(self.m):
                wanted = <bytes>self.keys[k]
                if (PyBytes_GET_SIZE(wanted) == key.size
                        and memcmp(PyBytes_AS_STRING(wanted), key.data, key.size) == 0):
                    self.offsets[row + k] = value.data - start
                    self.sizes[row + k] = value.size
        else:
            if p == end:
                return
        for k in range(self.m):  # not (only) a map of strings: not eventpulse's
            self.offsets[row + k] = NO_ENTRY

    cdef inline const unsigned char *_find(self, Py_ssize_t i, Py_ssize_t k,
                                           Py_ssize_t *size) noexcept:
        cdef Py_ssize_t cell = i * self.m + k
        if self.offsets[cell] == NO_ENTRY:
            return NULL
        size[0] = self.sizes[cell]
        return <const unsigned char *>PyBytes_AS_STRING(self.raws[i]) + self.offsets[cell]

    def entry(self, Py_ssize_t i, Py_ssize_t k):
        """Entity i's entry for key k, or None."""
        if not (0 <= i < self.n and 0 <= k < self.m):
            raise IndexError(f"no entry ({i}, {k}) in {self.n} entities x {self.m} keys")
        cdef Py_ssize_t size
        cdef const unsigned char *p = self._find(i, k, &size)
        return None if p is NULL else (<const char *>p)[:size]


# --- values ----------------------------------------------------------------------------------

cdef inline void _put(object value, Py_ssize_t i, object item):
    Py_INCREF(item)
    PyTuple_SET_ITEM(value, i, item)


cdef inline bint _atomic(object value) noexcept:
    return (value is None or type(value) is float or type(value) is int or type(value) is str
            or type(value) is bool)


cdef inline object _new_value(type value_type, object value, object start, object end,
                              int64_t newest, int64_t age, str status, object count):
    cdef object result = ep_alloc_value(value_type, FIELDS)
    _put(result, 0, value)
    _put(result, 1, start)
    _put(result, 2, end)
    _put(result, 3, newest)
    _put(result, 4, age)
    _put(result, 5, status)
    _put(result, 6, count)
    if _atomic(value):
        # what the collector does itself for tuples of atomic values, done now: a read makes a
        # thousand of these, and tracked ones make every young collection walk them
        PyObject_GC_UnTrack(result)
    return result


cdef _check(type value_type, EntityEntries entries, Py_ssize_t k, list rows):
    if not issubclass(value_type, tuple) or value_type.__basicsize__ != tuple.__basicsize__:
        raise TypeError(f"{value_type!r} is not a plain tuple subclass")
    if not 0 <= k < entries.m:
        raise IndexError(f"no key {k} among {entries.m}")
    if len(rows) != entries.n:
        raise ValueError(f"{len(rows)} rows for {entries.n} entities")
    for row in rows:
        if not PyDict_CheckExact(row):
            raise TypeError("rows must be dicts")


cdef inline const unsigned char *_usable_entry(
        EntityEntries entries, Py_ssize_t i, Py_ssize_t k, bytes signature, Py_ssize_t *size,
        int64_t *newest, int64_t *head) noexcept:
    """Entity i's entry for key k with its newest event time and head, or NULL where there is
    none to read: never seen, or not within its TTL; written for another window or aggregation
    (another signature); or holding event times eventpulse never writes."""
    cdef const unsigned char *entry = entries._find(i, k, size)
    cdef Py_ssize_t sig_len = PyBytes_GET_SIZE(signature)
    if (entry is NULL or size[0] < RING_AT or size[0] < sig_len
            or memcmp(entry, PyBytes_AS_STRING(signature), sig_len) != 0):
        return NULL
    newest[0] = _int64(entry + WHEN_AT)
    head[0] = _int64(entry + WHEN_AT + 8)
    if not (-TIME_LIMIT < newest[0] < TIME_LIMIT and -TIME_LIMIT < head[0] < TIME_LIMIT):
        return NULL
    return entry


cdef inline object _with_contract(type value_type, object value, object start, object end,
                                  int64_t newest, int64_t at, int64_t stale_after, str fresh,
                                  object count):
    cdef int64_t age = at - newest
    if age < 0:
        age = 0
    return _new_value(value_type, value, start, end, newest, age,
                      STALE if age > stale_after else fresh, count)


cdef object _last_value(const unsigned char *entry, Py_ssize_t size, int64_t slot,
                        object unknown):
    """ringread.last_value, walking the msgpack array only as far as the slot asked for;
    whatever the walk does not read itself goes to ringread.last_value."""
    cdef const unsigned char *end = entry + size
    cdef const unsigned char *p
    cdef Scalar time, value
    cdef uint64_t length
    cdef int64_t j = 2 * slot, i
    cdef int truth
    p = _container(entry + RING_AT, end, 0x90, 0xdc, &length)
    if p is NULL:
        return _slow_last(entry, size, slot)
    if j + 1 >= <int64_t>length:  # older than the ring keeps
        return unknown
    if j < 0:  # newer than every event
        return None
    for i in range(j + 1):  # up to and including the slot's event time
        p = _scalar_at(p, end, &time)
        if p is NULL:
            return _slow_last(entry, size, slot)
    truth = _truth(&time)
    p = _scalar_at(p, end, &value)
    if p is NULL or truth < 0:
        return _slow_last(entry, size, slot)
    if not truth:  # no event reached this window
        return None
    try:
        found = _scalar_object(&value)
    except UnicodeDecodeError:
        return _slow_last(entry, size, slot)
    if type(found) is str and (<str>found).startswith(LAST_ESCAPE):  # its JSON
        from eventpulse.tables.ring import last_read
        return last_read(found)
    return found


cdef object _slow_last(const unsigned char *entry, Py_ssize_t size, int64_t slot):
    from eventpulse.tables.ringread import last_value
    return last_value((<const char *>entry)[:size], slot)


def read_column(type value_type, f, EntityEntries entries, Py_ssize_t k, list rows, int64_t at,
                str fresh):
    if not EP_LITTLE_ENDIAN:  # entries are little-endian; a big-endian host uses Python
        from eventpulse.tables.ringread import read_column_python
        return read_column_python(value_type, f, entries, k, rows, at, fresh)
    _check(value_type, entries, k, rows)
    from eventpulse.tables.ringread import UNKNOWN
    cdef str name = f.name
    cdef Py_ssize_t i, size
    cdef bytes signature = f.signature
    cdef int code = f.code
    cdef int64_t width = f.width, step = f.step, end = f.end, stale_after = f.stale_after
    cdef object start = f.start, end_ms = f.end, missing = f.missing, unknown = f.unknown
    cdef object empty_value = missing.value, empty_count = missing.event_count, value, count
    cdef int64_t base = RING_AT - width * (end // step), newest, head, pos
    cdef const unsigned char *entry
    cdef double first, second = 0, events
    for i in range(entries.n):
        values = <dict>rows[i]
        entry = _usable_entry(entries, i, k, signature, &size, &newest, &head)
        if entry is NULL:
            values[name] = missing
            continue
        if code == LAST:  # a msgpack array of (event time, value) per slot
            value = _last_value(entry, size, (head - end) // step, UNKNOWN)
            if value is UNKNOWN:
                values[name] = unknown
                continue
            values[name] = _with_contract(value_type, value, start, end_ms, newest, at,
                                          stale_after, fresh, None)
            continue
        pos = base + width * (head // step)
        if pos + width > size:  # older than the ring keeps
            values[name] = unknown
            continue
        if pos < RING_AT:  # newer than every event: empty
            value = empty_value
            count = empty_count
        elif code == SUM:
            value = _double(entry + pos)
            count = None
        else:
            first = _double(entry + pos)
            if code == COUNT:
                events = first
            else:
                second = _double(entry + pos + 8)
                events = second if code == AVERAGE else first
            if not (0 <= events < COUNT_LIMIT):  # not a count of events (or NaN)
                values[name] = missing
                continue
            count = <int64_t>events
            if code == COUNT:
                value = count
            elif code == AVERAGE:  # sum or numerator, events
                value = first / second if second else None
            else:  # min, max: events, extreme
                value = second if first else None
        values[name] = _with_contract(value_type, value, start, end_ms, newest, at, stale_after,
                                      fresh, count)


# --- percentile sketches ---------------------------------------------------------------------

cdef struct Bin:
    int64_t key
    int64_t count

cdef extern from *:
    """
    static int ep_bin_ascending(const void *a, const void *b) {
        int64_t x = ((const int64_t *)a)[0], y = ((const int64_t *)b)[0];
        return (x > y) - (x < y);
    }
    static int ep_bin_descending(const void *a, const void *b) {
        return ep_bin_ascending(b, a);
    }
    static int ep_add(int64_t a, int64_t b, int64_t *out) {
        return __builtin_add_overflow(a, b, out);
    }
    """
    int ep_bin_ascending(const void *a, const void *b) noexcept nogil
    int ep_bin_descending(const void *a, const void *b) noexcept nogil
    int ep_add(int64_t a, int64_t b, int64_t *out) noexcept nogil

from libc.stdlib cimport qsort


cdef inline bint _decimal(const unsigned char *p, Py_ssize_t n, int64_t *out) noexcept:
    """``sketch.decimal`` of 1 to 18 digits (what Redis and ddsketch write: an optional '-',
    no leading zero, not "-0"), into ``out``; False for anything else, which the caller leaves
    to the Python twin."""
    cdef Py_ssize_t i = 0
    cdef int64_t v = 0
    cdef bint negative = n > 0 and p[0] == 45  # '-'
    if negative:
        i = 1
    if n - i < 1 or n - i > 18:
        return False
    if p[i] == 48 and (n - i > 1 or negative):  # '0' leading, or "-0"
        return False
    while i < n:
        if p[i] < 48 or p[i] > 57:
            return False
        v = v * 10 + (p[i] - 48)
        i += 1
    out[0] = -v if negative else v
    return True


cdef inline bint _ascii(object raw) noexcept:
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(raw)):
        if p[i] > 127:
            return False
    return True


cdef inline bint _count_of(object raw, int64_t *out) noexcept:
    """A count as HINCRBY leaves it (``ringread._count``): a non-negative decimal."""
    return PyBytes_CheckExact(raw) and _decimal(
        <const unsigned char *>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), out) \
        and out[0] >= 0


cdef bint _merge(dict merged, object field, object raw):
    """Add one bin's count to ``merged``; False where the Python twin must decide."""
    cdef int64_t count, summed
    if not PyBytes_CheckExact(field) or not _count_of(raw, &count):
        return False
    old = merged.get(field)
    if old is None:
        if not _ascii(field):  # Python decodes it (and may refuse it) first
            return False
        merged[field] = count
    else:
        if ep_add(<int64_t>old, count, &summed):
            return False
        merged[field] = summed
    return True


def quantile_bin(list replies, double q):
    """``ringread.quantile_bin_python``: the bucket hashes merged and the quantile's bin found
    in C. Replies of another shape than eventpulse writes (not a dict, a field or count that is
    not a short decimal, sums beyond 2**53) are left to the Python twin, which has the last
    word on them."""
    cdef dict merged = {}
    cdef object bins, field, raw
    cdef int64_t count
    cdef Py_ssize_t j
    for bins in replies:
        if PyDict_CheckExact(bins):  # RESP3
            for field, raw in (<dict>bins).items():
                if not _merge(merged, field, raw):
                    return _python_quantile_bin(replies, q)
        elif PyList_CheckExact(bins) and len(<list>bins) % 2 == 0:  # RESP2
            for j in range(0, len(<list>bins), 2):
                if not _merge(merged, (<list>bins)[j], (<list>bins)[j + 1]):
                    return _python_quantile_bin(replies, q)
        else:
            return _python_quantile_bin(replies, q)
    cdef Py_ssize_t n = len(merged), n_negative = 0, n_positive = 0, i
    cdef Bin *negative = <Bin *>PyMem_Malloc(max(n, 1) * sizeof(Bin))
    cdef Bin *positive = <Bin *>PyMem_Malloc(max(n, 1) * sizeof(Bin))
    cdef int64_t key, zero = 0, total = 0, seen = 0
    cdef const unsigned char *p
    cdef Py_ssize_t size
    cdef double rank
    if negative == NULL or positive == NULL:
        PyMem_Free(negative)
        PyMem_Free(positive)
        raise MemoryError()
    try:
        for field, raw in merged.items():
            count = <int64_t>raw
            if count <= 0:
                continue
            p = <const unsigned char *>PyBytes_AS_STRING(field)
            size = PyBytes_GET_SIZE(field)
            if size == 1 and p[0] == 122:  # 'z', sketch.ZERO_BIN
                if ep_add(zero, count, &zero):
                    return _python_quantile_bin(replies, q)
            elif size > 1 and p[0] == 110 and _decimal(p + 1, size - 1, &key):  # 'n...'
                negative[n_negative].key, negative[n_negative].count = key, count
                n_negative += 1
            elif _decimal(p, size, &key):
                positive[n_positive].key, positive[n_positive].count = key, count
                n_positive += 1
            else:  # not a bin eventpulse writes: Python says what it makes of it
                return _python_quantile_bin(replies, q)
            if ep_add(total, count, &total) or total >= (1LL << 53):
                return _python_quantile_bin(replies, q)
        if total == 0:
            return None
        rank = q * <double>(total - 1)
        qsort(negative, n_negative, sizeof(Bin), ep_bin_descending)
        for i in range(n_negative):
            seen += negative[i].count
            if seen > rank:
                return -1, negative[i].key
        seen += zero
        if seen > rank:
            return 0, 0
        qsort(positive, n_positive, sizeof(Bin), ep_bin_ascending)
        for i in range(n_positive):
            seen += positive[i].count
            if seen > rank:
                return 1, positive[i].key
        if n_positive:  # not reached (rank < total), as in the twin
            return 1, positive[n_positive - 1].key
        return 0, 0
    finally:
        PyMem_Free(negative)
        PyMem_Free(positive)


cdef object _python_quantile_bin(list replies, double q):
    from eventpulse.tables.ringread import quantile_bin_python
    return quantile_bin_python(replies, q)


def constants():
    """The constants this module was compiled with, by the names of their sources in
    ``eventpulse.tables.kinds`` (tests/test_kinds.py holds them to that table)."""
    return {"READ_COUNT": COUNT, "READ_SUM": SUM, "READ_AVERAGE": AVERAGE,
            "READ_EXTREME": EXTREME, "READ_LAST": LAST, "HEADER_SIZE": RING_AT,
            "WHEN_AT": WHEN_AT, "TIME_LIMIT": TIME_LIMIT, "COUNT_LIMIT": COUNT_LIMIT,
            "LAST_ESCAPE": LAST_ESCAPE}
