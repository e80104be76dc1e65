"""
imxd: an IMX (Instant Messaging eXchange) server and Aggregator on Twisted.
"""

__version__ = "0.1.0"
