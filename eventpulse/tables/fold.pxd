# Augments fold.py when Cython compiles it (setup.py): HotFeature becomes an extension type
# whose fields are C members, read by the fold without a lookup. The names and their meaning
# are fold.py's; plain Python ignores this file.

cdef class HotFeature:
    cdef public Py_ssize_t findex
    cdef public object lua_index
    cdef public int code
    cdef public object is_match
    cdef public object is_numerator
    cdef public object match_field
    cdef public object match_value
    cdef public object numerator_field
    cdef public object numerator_value
    cdef public object value_field
    cdef public object value_of
    cdef public Py_ssize_t width
    cdef public tuple empty
    cdef public double op_cost
    cdef public double bucket_cost
    cdef public long long step
