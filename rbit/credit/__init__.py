"""Credit accounting: the ``rbit-credit`` front door and the credit event format."""
