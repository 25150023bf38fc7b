"""Studies that train many small runs on synthetic features (`neuclip study ...`)."""
