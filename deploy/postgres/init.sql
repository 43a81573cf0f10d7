-- Every process's database (each would also create its own at start if it were missing): the
-- services', the stand-in card processor's ledger, and the saga monitor's projection.
CREATE DATABASE orders;
CREATE DATABASE inventory;
CREATE DATABASE payments;
CREATE DATABASE gateway;
CREATE DATABASE monitor;
