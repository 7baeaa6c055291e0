"""
The wire protocol: length-prefixed frames carrying versioned msgpack messages.
"""
