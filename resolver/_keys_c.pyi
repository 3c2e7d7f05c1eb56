"""Types of the compiled index keys, ext/_keys_c.pyx: its twin's interface (resolver/_keys_py.py).

`KeyHasher` is typed as the twin's class: resolver/_hotpath.py binds one name to either implementation, so the
type checker must see one class (a cdef class cannot subclass the Python one to say so at run time).
"""

from resolver._keys_py import KeyHasher as KeyHasher

KEY_SIZE: int
ALGORITHMS: tuple[str, str]
