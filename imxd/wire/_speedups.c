/*
 * imxd.wire._speedups: imxd's hot paths in C -- the record codec, and the
 * Bloom filter of the dedupe table's seen filter (at the end).
 *
 * A Schema describes one record class (its fields, in declaration order,
 * and the slot descriptors its instances are filled through).  Its two
 * methods take only the path a valid record takes:
 *
 *   Schema.decode(flags, tag, body) -> the record, or None
 *   Schema.encode(record)           -> the body's bytes, or None
 *
 * None means "not the common case": an unknown field, a value out of its
 * bounds, text that is not UTF-8, a missing required field, a value of an
 * unexpected type.  The caller then runs the Python codec in
 * imxd/wire/records.py, which is the reference: it gives the same answer
 * for every valid record and the error, with its explanation, for the
 * rest.  So this file never decides what is an error; it only declines.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Field kinds; the numbers imxd/wire/records.py passes. */
enum { KIND_STRING = 0, KIND_BYTES = 1, KIND_U16 = 2, KIND_U32 = 3, KIND_TAGS = 4 };

#define MUST_UNDERSTAND_BIT 0x8000u
#define FLAG_MUST_UNDERSTAND 0x0001u
#define FLAG_RESPONSE 0x0002u

typedef struct {
    unsigned int identifier;
    int kind;
    Py_ssize_t low, high;
    int repeated, required;
    PyObject *descriptor; /* the attribute's slot descriptor */
    PyObject *fallback;   /* its default: None, or () when repeated */
} FieldInfo;

typedef struct {
    PyObject_HEAD
    PyTypeObject *cls;
    Py_ssize_t count;
    FieldInfo *fields;
    PyObject *tagDescriptor, *responseDescriptor, *mustUnderstandDescriptor, *wireDescriptor;
    int alwaysResponse;
    unsigned int recordType; /* the class's TYPE */
} SchemaObject;

static void
Schema_dealloc(SchemaObject *self)
{
    for (Py_ssize_t i = 0; i < self->count; i++) {
        Py_XDECREF(self->fields[i].descriptor);
        Py_XDECREF(self->fields[i].fallback);
    }
    PyMem_Free(self->fields);
    Py_XDECREF(self->cls);
    Py_XDECREF(self->tagDescriptor);
    Py_XDECREF(self->responseDescriptor);
    Py_XDECREF(self->mustUnderstandDescriptor);
    Py_XDECREF(self->wireDescriptor);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The slot descriptor of a class attribute; it must be settable. */
static PyObject *
slotDescriptor(PyObject *cls, PyObject *name)
{
    PyObject *descriptor = PyObject_GetAttr(cls, name);
    if (descriptor == NULL)
        return NULL;
    if (!Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%R is not a slot", name);
        Py_DECREF(descriptor);
        return NULL;
    }
    return descriptor;
}

static PyObject *
slotDescriptorOf(PyObject *cls, const char *name)
{
    PyObject *text = PyUnicode_FromString(name);
    if (text == NULL)
        return NULL;
    PyObject *descriptor = slotDescriptor(cls, text);
    Py_DECREF(text);
    return descriptor;
}

/*
 * Schema(cls, fields, alwaysResponse)
 *   fields: a tuple of (attribute, identifier, kind, low, high, repeated,
 *   required) in the order the class declares them.
 */
static int
Schema_init(SchemaObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *cls, *fields;
    int alwaysResponse;
    (void)kwargs;
    if (!PyArg_ParseTuple(args, "O!O!p", &PyType_Type, &cls, &PyTuple_Type, &fields,
                          &alwaysResponse))
        return -1;
    if (self->fields != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Schema is initialised once");
        return -1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(fields);
    self->fields = PyMem_Calloc(count ? count : 1, sizeof(FieldInfo));
    if (self->fields == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->count = count;
    for (Py_ssize_t i = 0; i < count; i++) {
        FieldInfo *info = &self->fields[i];
        PyObject *name;
        unsigned int identifier;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, i), "UIinnpp", &name, &identifier,
                              &info->kind, &info->low, &info->high, &info->repeated,
                              &info->required))
            return -1;
        if (info->kind < KIND_STRING || info->kind > KIND_TAGS || identifier > 0x7FFF) {
            PyErr_SetString(PyExc_ValueError, "bad field kind or identifier");
            return -1;
        }
        info->identifier = identifier;
        info->descriptor = slotDescriptor(cls, name);
        if (info->descriptor == NULL)
            return -1;
        info->fallback = info->repeated ? PyTuple_New(0) : Py_NewRef(Py_None);
        if (info->fallback == NULL)
            return -1;
    }
    PyObject *recordType = PyObject_GetAttrString(cls, "TYPE");
    if (recordType == NULL)
        return -1;
    unsigned long number = PyLong_AsUnsignedLong(recordType);
    Py_DECREF(recordType);
    if (number == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (number > 0xFFFFul) {
        PyErr_SetString(PyExc_ValueError, "the record type is not a u16");
        return -1;
    }
    self->recordType = (unsigned int)number;
    self->cls = (PyTypeObject *)Py_NewRef(cls);
    self->alwaysResponse = alwaysResponse;
    if ((self->tagDescriptor = slotDescriptorOf(cls, "tag")) == NULL ||
        (self->responseDescriptor = slotDescriptorOf(cls, "response")) == NULL ||
        (self->mustUnderstandDescriptor = slotDescriptorOf(cls, "mustUnderstand")) == NULL ||
        (self->wireDescriptor = slotDescriptorOf(cls, "_wire")) == NULL)
        return -1;
    return 0;
}

static inline unsigned int
readU16(const unsigned char *p)
{
    return ((unsigned int)p[0] << 8) | p[1];
}

static inline unsigned long
readU32(const unsigned char *p)
{
    return ((unsigned long)p[0] << 24) | ((unsigned long)p[1] << 16) |
           ((unsigned long)p[2] << 8) | p[3];
}

/* One value, or NULL with no exception set when it is not a valid one. */
static PyObject *
decodeValue(int kind, const unsigned char *data, Py_ssize_t length)
{
    switch (kind) {
    case KIND_STRING: {
        if (memchr(data, 0, (size_t)length) != NULL)
            return NULL;
        PyObject *text = PyUnicode_DecodeUTF8((const char *)data, length, NULL);
        if (text == NULL)
            PyErr_Clear();
        return text;
    }
    case KIND_BYTES:
        return PyBytes_FromStringAndSize((const char *)data, length);
    case KIND_U16:
        return length == 2 ? PyLong_FromUnsignedLong(readU16(data)) : NULL;
    case KIND_U32:
        return length == 4 ? PyLong_FromUnsignedLong(readU32(data)) : NULL;
    default: {
        if (length % 4)
            return NULL;
        Py_ssize_t n = length / 4;
        PyObject *tags = PyTuple_New(n);
        if (tags == NULL) {
            PyErr_Clear();
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *tag = PyLong_FromUnsignedLong(readU32(data + 4 * i));
            if (tag == NULL) {
                PyErr_Clear();
                Py_DECREF(tags);
                return NULL;
            }
            PyTuple_SET_ITEM(tags, i, tag);
        }
        return tags;
    }
    }
}

static int
setSlot(PyObject *descriptor, PyObject *object, PyObject *value)
{
    return Py_TYPE(descriptor)->tp_descr_set(descriptor, object, value);
}

#define SMALL_SCHEMA 16

/* The record a body holds, None (a new reference) to decline, NULL on error. */
static PyObject *
decodeBody(SchemaObject *self, unsigned long flags, PyObject *tag, PyObject *body)
{
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(body);
    Py_ssize_t end = PyBytes_GET_SIZE(body);
    Py_ssize_t count = self->count;
    PyObject *small[SMALL_SCHEMA];
    PyObject **values = small;
    PyObject *result = NULL;
    if (count > SMALL_SCHEMA) {
        values = PyMem_Calloc(count, sizeof(PyObject *));
        if (values == NULL)
            return PyErr_NoMemory();
    } else {
        memset(small, 0, sizeof(small));
    }
    Py_ssize_t offset = 0;
    while (offset < end) {
        if (end - offset < 6)
            goto decline;
        unsigned int identifier = readU16(data + offset);
        unsigned long length = readU32(data + offset + 2);
        Py_ssize_t start = offset + 6;
        if ((unsigned long)(end - start) < length)
            goto decline;
        offset = start + (Py_ssize_t)length;
        unsigned int wanted = identifier & ~MUST_UNDERSTAND_BIT;
        Py_ssize_t index = 0;
        while (index < count && self->fields[index].identifier != wanted)
            index++;
        if (index == count)
            goto decline; /* an unknown field: the reference decides */
        FieldInfo *info = &self->fields[index];
        if ((Py_ssize_t)length < info->low || (Py_ssize_t)length > info->high)
            goto decline;
        if (!info->repeated && values[index] != NULL)
            goto decline;
        PyObject *value = decodeValue(info->kind, data + start, (Py_ssize_t)length);
        if (value == NULL)
            goto decline;
        if (info->repeated) {
            if (values[index] == NULL) {
                values[index] = PyList_New(0);
                if (values[index] == NULL) {
                    Py_DECREF(value);
                    goto fail;
                }
            }
            int appended = PyList_Append(values[index], value);
            Py_DECREF(value);
            if (appended < 0)
                goto fail;
        } else {
            values[index] = value;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        FieldInfo *info = &self->fields[i];
        if (values[i] == NULL) {
            if (info->required)
                goto decline;
        } else if (info->repeated) {
            PyObject *items = PyList_AsTuple(values[i]);
            if (items == NULL)
                goto fail;
            Py_SETREF(values[i], items);
        }
    }
    PyObject *record = self->cls->tp_alloc(self->cls, 0);
    if (record == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        FieldInfo *info = &self->fields[i];
        if (setSlot(info->descriptor, record, values[i] ? values[i] : info->fallback) < 0)
            goto failRecord;
    }
    PyObject *response =
        (self->alwaysResponse || (flags & FLAG_RESPONSE)) ? Py_True : Py_False;
    PyObject *mustUnderstand = (flags & FLAG_MUST_UNDERSTAND) ? Py_True : Py_False;
    if (setSlot(self->tagDescriptor, record, tag) < 0 ||
        setSlot(self->responseDescriptor, record, response) < 0 ||
        setSlot(self->mustUnderstandDescriptor, record, mustUnderstand) < 0 ||
        setSlot(self->wireDescriptor, record, body) < 0)
        goto failRecord;
    result = record;
    goto done;
failRecord:
    Py_DECREF(record);
    goto fail;
decline:
    result = Py_NewRef(Py_None);
fail:
done:
    for (Py_ssize_t i = 0; i < count; i++)
        Py_XDECREF(values[i]);
    if (values != small)
        PyMem_Free(values);
    return result;
}

static PyObject *
Schema_decode(SchemaObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "decode(flags, tag, body: bytes)");
        return NULL;
    }
    unsigned long flags = PyLong_AsUnsignedLong(args[0]);
    if (flags == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return decodeBody(self, flags, args[1], args[2]);
}

/* A growing output buffer: on the caller's stack until it outgrows it. */
typedef struct {
    char *data;
    Py_ssize_t size, capacity;
    int owned; /* whether data is ours to free */
} Buffer;

static int
reserve(Buffer *buffer, Py_ssize_t more)
{
    if (buffer->size + more <= buffer->capacity)
        return 0;
    Py_ssize_t capacity = buffer->capacity * 2;
    if (capacity < buffer->size + more)
        capacity = buffer->size + more;
    char *data = buffer->owned ? PyMem_Realloc(buffer->data, (size_t)capacity)
                               : PyMem_Malloc((size_t)capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (!buffer->owned)
        memcpy(data, buffer->data, (size_t)buffer->size);
    buffer->data = data;
    buffer->capacity = capacity;
    buffer->owned = 1;
    return 0;
}

static inline void
writeU16(unsigned char *p, unsigned int value)
{
    p[0] = (unsigned char)(value >> 8);
    p[1] = (unsigned char)value;
}

static inline void
writeU32(unsigned char *p, unsigned long value)
{
    p[0] = (unsigned char)(value >> 24);
    p[1] = (unsigned char)(value >> 16);
    p[2] = (unsigned char)(value >> 8);
    p[3] = (unsigned char)value;
}

/* 1 written, 0 declined, -1 failed (exception set). */
static int
encodeItem(Buffer *buffer, FieldInfo *info, PyObject *value)
{
    const char *raw = NULL;
    Py_ssize_t length = 0;
    unsigned char number[4];
    switch (info->kind) {
    case KIND_STRING:
        if (!PyUnicode_CheckExact(value))
            return 0;
        raw = PyUnicode_AsUTF8AndSize(value, &length);
        if (raw == NULL) {
            PyErr_Clear(); /* lone surrogates: the reference explains */
            return 0;
        }
        if (memchr(raw, 0, (size_t)length) != NULL)
            return 0;
        break;
    case KIND_BYTES:
        if (!PyBytes_CheckExact(value))
            return 0;
        raw = PyBytes_AS_STRING(value);
        length = PyBytes_GET_SIZE(value);
        break;
    case KIND_U16:
    case KIND_U32: {
        if (!PyLong_CheckExact(value))
            return 0;
        unsigned long number_ = PyLong_AsUnsignedLong(value);
        if (number_ == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (info->kind == KIND_U16) {
            if (number_ > 0xFFFFul)
                return 0;
            writeU16(number, (unsigned int)number_);
            length = 2;
        } else {
            if (number_ > 0xFFFFFFFFul)
                return 0;
            writeU32(number, number_);
            length = 4;
        }
        raw = (const char *)number;
        break;
    }
    default: {
        if (!PyTuple_CheckExact(value))
            return 0;
        Py_ssize_t n = PyTuple_GET_SIZE(value);
        length = 4 * n;
        if (length < info->low || length > info->high)
            return 0;
        if (reserve(buffer, 6 + length) < 0)
            return -1;
        unsigned char *p = (unsigned char *)buffer->data + buffer->size;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PyTuple_GET_ITEM(value, i);
            if (!PyLong_CheckExact(item))
                return 0;
            unsigned long tag = PyLong_AsUnsignedLong(item);
            if ((tag == (unsigned long)-1 && PyErr_Occurred()) || tag > 0xFFFFFFFFul) {
                PyErr_Clear();
                return 0;
            }
            writeU32(p + 6 + 4 * i, tag);
        }
        writeU16(p, info->identifier);
        writeU32(p + 2, (unsigned long)length);
        buffer->size += 6 + length;
        return 1;
    }
    }
    if (length < info->low || length > info->high)
        return 0;
    if (reserve(buffer, 6 + length) < 0)
        return -1;
    unsigned char *p = (unsigned char *)buffer->data + buffer->size;
    writeU16(p, info->identifier);
    writeU32(p + 2, (unsigned long)length);
    memcpy(p + 6, raw, (size_t)length);
    buffer->size += 6 + length;
    return 1;
}

static PyObject *
Schema_encode(SchemaObject *self, PyObject *record)
{
    if (Py_TYPE(record) != self->cls)
        Py_RETURN_NONE; /* a subclass may add what the schema does not know */
    char small[512] = {0};
    Buffer buffer = {small, 0, sizeof(small), 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < self->count; i++) {
        FieldInfo *info = &self->fields[i];
        PyObject *value = Py_TYPE(info->descriptor)
                              ->tp_descr_get(info->descriptor, record, (PyObject *)self->cls);
        if (value == NULL)
            goto fail;
        int status = 1;
        if (info->repeated) {
            if (!PyTuple_CheckExact(value))
                status = 0;
            else if (PyTuple_GET_SIZE(value) == 0)
                status = info->required ? 0 : 1;
            else
                for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(value) && status == 1; j++)
                    status = encodeItem(&buffer, info, PyTuple_GET_ITEM(value, j));
        } else if (value == Py_None) {
            status = info->required ? 0 : 1;
        } else {
            status = encodeItem(&buffer, info, value);
        }
        Py_DECREF(value);
        if (status < 0)
            goto fail;
        if (status == 0) {
            result = Py_NewRef(Py_None);
            goto fail;
        }
    }
    result = PyBytes_FromStringAndSize(buffer.data, buffer.size);
fail:
    if (buffer.owned)
        PyMem_Free(buffer.data);
    return result;
}

/*
 * The record's frame: header and body, the body encoded once and kept in
 * the record's _wire slot.  None for anything unusual (a tag that is not a
 * u32, a body the encoder declines).
 */
static PyObject *
Schema_frame(SchemaObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "frame(record, tag)");
        return NULL;
    }
    PyObject *record = args[0];
    if (Py_TYPE(record) != self->cls)
        Py_RETURN_NONE;
    PyObject *tagObject = args[1];
    int ownTag = tagObject == Py_None;
    if (ownTag) {
        tagObject = Py_TYPE(self->tagDescriptor)
                        ->tp_descr_get(self->tagDescriptor, record, (PyObject *)self->cls);
        if (tagObject == NULL)
            return NULL;
    }
    unsigned long tag = PyLong_CheckExact(tagObject) ? PyLong_AsUnsignedLong(tagObject)
                                                     : (unsigned long)-1;
    if (ownTag)
        Py_DECREF(tagObject);
    if (tag == (unsigned long)-1 || tag > 0xFFFFFFFFul) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    unsigned int flags = 0;
    PyObject *response = Py_TYPE(self->responseDescriptor)
                             ->tp_descr_get(self->responseDescriptor, record, NULL);
    if (response == NULL)
        return NULL;
    int isResponse = self->alwaysResponse || PyObject_IsTrue(response);
    Py_DECREF(response);
    PyObject *mustUnderstand = Py_TYPE(self->mustUnderstandDescriptor)
                                   ->tp_descr_get(self->mustUnderstandDescriptor, record, NULL);
    if (mustUnderstand == NULL)
        return NULL;
    int isMustUnderstand = PyObject_IsTrue(mustUnderstand);
    Py_DECREF(mustUnderstand);
    if (isResponse < 0 || isMustUnderstand < 0)
        return NULL;
    flags = (isResponse ? FLAG_RESPONSE : 0) | (isMustUnderstand ? FLAG_MUST_UNDERSTAND : 0);
    PyObject *body = Py_TYPE(self->wireDescriptor)->tp_descr_get(self->wireDescriptor, record, NULL);
    if (body == NULL)
        return NULL;
    if (body == Py_None) {
        Py_DECREF(body);
        body = Schema_encode(self, record);
        if (body == NULL || body == Py_None)
            return body;
        if (setSlot(self->wireDescriptor, record, body) < 0) {
            Py_DECREF(body);
            return NULL;
        }
    }
    if (!PyBytes_CheckExact(body)) {
        Py_DECREF(body);
        Py_RETURN_NONE;
    }
    Py_ssize_t length = PyBytes_GET_SIZE(body);
    if ((size_t)length > 0xFFFFFFFFu) {
        Py_DECREF(body);
        Py_RETURN_NONE;
    }
    PyObject *frame = PyBytes_FromStringAndSize(NULL, 12 + length);
    if (frame != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
        writeU32(p, (unsigned long)length);
        writeU16(p + 4, self->recordType);
        writeU16(p + 6, flags);
        writeU32(p + 8, tag);
        memcpy(p + 12, PyBytes_AS_STRING(body), (size_t)length);
    }
    Py_DECREF(body);
    return frame;
}

static PyMethodDef Schema_methods[] = {
    {"frame", (PyCFunction)(void (*)(void))Schema_frame, METH_FASTCALL,
     "frame(record, tag) -> the record's bytes (tag None: its own), or None to leave it to "
     "the reference codec."},
    {"decode", (PyCFunction)(void (*)(void))Schema_decode, METH_FASTCALL,
     "decode(flags, tag, body) -> the record, or None to leave it to the reference codec."},
    {"encode", (PyCFunction)Schema_encode, METH_O,
     "encode(record) -> the record body, or None to leave it to the reference codec."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SchemaType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "imxd.wire._speedups.Schema",
    .tp_basicsize = sizeof(SchemaObject),
    .tp_dealloc = (destructor)Schema_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Schema(cls, fields, alwaysResponse): the fast codec of one record class.",
    .tp_methods = Schema_methods,
    .tp_init = (initproc)Schema_init,
    .tp_new = PyType_GenericNew,
};

/*
 * Bloom(words): one blocked Bloom filter of `words` 64-bit words (a power
 * of two), the seen filter's generation (imxd/store/seenfilter.py holds
 * the reference in Python).  An id's 64-bit hash selects one word by its
 * top 28 bits and sets six bits in it, chosen by six 6-bit pieces of its
 * low 36 bits.
 */
typedef struct {
    PyObject_HEAD
    unsigned long long *words;
    unsigned long long mask;
} BloomObject;

static void
Bloom_dealloc(BloomObject *self)
{
    PyMem_Free(self->words);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Bloom_init(BloomObject *self, PyObject *args, PyObject *kwargs)
{
    Py_ssize_t words;
    (void)kwargs;
    if (!PyArg_ParseTuple(args, "n", &words))
        return -1;
    if (words < 1 || (words & (words - 1)) || self->words != NULL) {
        PyErr_SetString(PyExc_ValueError, "Bloom(words): a power of two, once");
        return -1;
    }
    self->words = PyMem_Calloc((size_t)words, sizeof(unsigned long long));
    if (self->words == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->mask = (unsigned long long)words - 1;
    return 0;
}

/* The word index and the bits of a hash; -1 with an exception if it is not an int. */
static int
bloomProbe(PyObject *hash, unsigned long long *index, unsigned long long *bits)
{
    unsigned long long value = PyLong_AsUnsignedLongLongMask(hash);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *index = value >> 36;
    *bits = 0;
    for (int i = 0; i < 6; i++)
        *bits |= 1ULL << ((value >> (6 * i)) & 63);
    return 0;
}

static int
bloomReady(BloomObject *self)
{
    if (self->words != NULL)
        return 0;
    PyErr_SetString(PyExc_ValueError, "Bloom(words) was not initialised");
    return -1;
}

static PyObject *
Bloom_add(BloomObject *self, PyObject *hash)
{
    unsigned long long index, bits;
    if (bloomReady(self) < 0 || bloomProbe(hash, &index, &bits) < 0)
        return NULL;
    self->words[index & self->mask] |= bits;
    Py_RETURN_NONE;
}

static PyObject *
Bloom_mayContain(BloomObject *self, PyObject *hash)
{
    unsigned long long index, bits;
    if (bloomReady(self) < 0 || bloomProbe(hash, &index, &bits) < 0)
        return NULL;
    return PyBool_FromLong((self->words[index & self->mask] & bits) == bits);
}

static PyMethodDef Bloom_methods[] = {
    {"add", (PyCFunction)Bloom_add, METH_O, "add(hash): remember a 64-bit hash."},
    {"mayContain", (PyCFunction)Bloom_mayContain, METH_O,
     "mayContain(hash) -> False if the hash was certainly not added."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BloomType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "imxd.wire._speedups.Bloom",
    .tp_basicsize = sizeof(BloomObject),
    .tp_dealloc = (destructor)Bloom_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bloom(words): a blocked Bloom filter of 64-bit hashes.",
    .tp_methods = Bloom_methods,
    .tp_init = (initproc)Bloom_init,
    .tp_new = PyType_GenericNew,
};

/*
 * splitFrames(frameType, buffer, limit[, schemas]) -> (items, consumed)
 *
 * Cut the complete records at the start of buffer into frameType tuples
 * (type, flags, tag, body).  It stops at the first record that is not
 * complete or whose header announces more than limit octets: the caller
 * (imxd/wire/framing.py) looks at what is left and raises for the latter.
 * With schemas (a dict of Schema by record type), a record its schema
 * decodes is given decoded, in place of its frame.
 */
static PyObject *
splitFrames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if ((nargs != 3 && nargs != 4) || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type) ||
        (nargs == 4 && args[3] != Py_None && !PyDict_CheckExact(args[3]))) {
        PyErr_SetString(PyExc_TypeError, "splitFrames(frameType, buffer, limit[, schemas])");
        return NULL;
    }
    PyObject *schemas = nargs == 4 && args[3] != Py_None ? args[3] : NULL;
    PyTypeObject *frameType = (PyTypeObject *)args[0];
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t end = view.len, offset = 0;
    PyObject *frames = PyList_New(0);
    if (frames == NULL)
        goto fail;
    while (end - offset >= 12) {
        const unsigned char *header = data + offset;
        unsigned long length = readU32(header);
        if (length > (unsigned long)limit || length > (unsigned long)(end - offset - 12))
            break;
        PyObject *items[4] = {
            PyLong_FromUnsignedLong(readU16(header + 4)),
            PyLong_FromUnsignedLong(readU16(header + 6)),
            PyLong_FromUnsignedLong(readU32(header + 8)),
            PyBytes_FromStringAndSize((const char *)header + 12, (Py_ssize_t)length),
        };
        offset += 12 + (Py_ssize_t)length;
        if (items[0] == NULL || items[1] == NULL || items[2] == NULL || items[3] == NULL) {
            for (int i = 0; i < 4; i++)
                Py_XDECREF(items[i]);
            goto fail;
        }
        if (schemas != NULL) {
            PyObject *schema = PyDict_GetItemWithError(schemas, items[0]);
            if (schema == NULL && PyErr_Occurred()) {
                for (int i = 0; i < 4; i++)
                    Py_DECREF(items[i]);
                goto fail;
            }
            if (schema != NULL && Py_IS_TYPE(schema, &SchemaType)) {
                /* Held: decoding may run the collector, and with it any code. */
                Py_INCREF(schema);
                PyObject *record = decodeBody((SchemaObject *)schema, readU16(header + 6),
                                              items[2], items[3]);
                Py_DECREF(schema);
                if (record != NULL && record != Py_None) {
                    for (int i = 0; i < 4; i++)
                        Py_DECREF(items[i]);
                    int appended = PyList_Append(frames, record);
                    Py_DECREF(record);
                    if (appended < 0)
                        goto fail;
                    continue;
                }
                if (record == NULL) {
                    for (int i = 0; i < 4; i++)
                        Py_DECREF(items[i]);
                    goto fail;
                }
                Py_DECREF(record); /* declined: the frame goes to the reference */
            }
        }
        PyObject *frame = frameType->tp_alloc(frameType, 4);
        if (frame == NULL) {
            for (int i = 0; i < 4; i++)
                Py_DECREF(items[i]);
            goto fail;
        }
        for (int i = 0; i < 4; i++)
            PyTuple_SET_ITEM(frame, i, items[i]);
        int appended = PyList_Append(frames, frame);
        Py_DECREF(frame);
        if (appended < 0)
            goto fail;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nn)", frames, offset);
fail:
    Py_XDECREF(frames);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"splitFrames", (PyCFunction)(void (*)(void))splitFrames, METH_FASTCALL,
     "splitFrames(frameType, buffer, limit[, schemas]) -> (items, consumed): the complete "
     "records at the start of buffer, as frames, or decoded where schemas decode them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedupsModule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "imxd.wire._speedups",
    .m_doc = "The record codec's hot path and the seen filter's Bloom filter in C; "
             "imxd/wire/records.py and imxd/store/seenfilter.py are the reference.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&SchemaType) < 0 || PyType_Ready(&BloomType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&speedupsModule);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Schema", (PyObject *)&SchemaType) < 0 ||
        PyModule_AddObjectRef(module, "Bloom", (PyObject *)&BloomType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
