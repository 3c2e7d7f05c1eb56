"""Types of the compiled load path, ext/_load_c.pyx: its twin's interface (resolver/_load_py.py).

The classes are typed as the twin's: resolver/_hotpath.py binds one name to either implementation, so the type
checker must see one class (a cdef class cannot subclass the Python one to say so at run time).
"""

from resolver._load_py import CreateQueue as CreateQueue
from resolver._load_py import KeyFilter as KeyFilter
from resolver._load_py import RowPlanner as RowPlanner
from resolver._load_py import entry_derived as entry_derived

__all__ = ["CreateQueue", "KeyFilter", "RowPlanner", "entry_derived"]
