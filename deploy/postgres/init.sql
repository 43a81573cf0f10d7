-- Both services' databases (each service would also create its own at start if it were missing).
CREATE DATABASE orders;
CREATE DATABASE inventory;
